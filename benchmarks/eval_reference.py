"""Reference check of the evaluator and the Embedder's speed.

all-MiniLM-L6-v2 on SciFact test (BEIR, exact cosine search over title + " " + text) must give the published MTEB
NDCG@10 = 0.6451 (± 0.001). Encode throughput of stm-ray's Embedder is measured beside plain
``SentenceTransformer.encode`` on the same texts, same batch size, same threads (goal >= 0.95x).

    python benchmarks/eval_reference.py [--scifact ../shared/data/scifact] [--batch-size 32]

Writes benchmarks/results/eval_reference.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import claim, write_results  # noqa: E402

REFERENCE = 0.6451


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("STM_RAY_SCIFACT", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")))
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact}; pass --scifact DIR (a BEIR folder)", file=sys.stderr)
        return 2

    from sentence_transformers import SentenceTransformer

    from stm_ray.data import load_task
    from stm_ray.eval import evaluate_run, exact_search
    from stm_ray.eval.search import to_run
    from stm_ray.modeling import Embedder
    from stm_ray.modeling.aliases import minilm_path

    split = load_task(f"beir:{args.scifact}").split("test")
    texts = split.corpus + split.queries
    print(f"SciFact test: {len(split)} queries, {len(split.corpus)} documents; {len(texts)} texts to encode")
    ours = Embedder.from_pretrained("minilm", batch_size=args.batch_size)
    st = SentenceTransformer(minilm_path(), device="cpu")
    warm = texts[:256]
    ours.encode(warm), st.encode(warm, batch_size=args.batch_size)

    t = time.perf_counter()
    st_docs = st.encode(split.corpus, batch_size=args.batch_size)
    st_q = st.encode(split.queries, batch_size=args.batch_size)
    st_s = time.perf_counter() - t
    t = time.perf_counter()
    docs = ours.encode_corpus(split.corpus)
    q = ours.encode_queries(split.queries)
    ours_s = time.perf_counter() - t

    def ndcg(qe, de):
        s, i = exact_search(qe, de, top_k=100)
        return evaluate_run(to_run(split.query_ids, split.corpus_ids, s, i), split.relevant, [10, 100])[0]

    m_ours, m_st = ndcg(q, docs), ndcg(st_q, st_docs)
    ratio = st_s / ours_s
    rows = [("stm-ray Embedder", ours_s, len(texts) / ours_s, m_ours["ndcg_at_10"]),
            ("SentenceTransformer.encode", st_s, len(texts) / st_s, m_st["ndcg_at_10"])]
    print(f"\n{'encoder':<28} {'seconds':>8} {'texts/s':>8} {'NDCG@10':>8}")
    for name, s, tps, n in rows:
        print(f"{name:<28} {s:>8.1f} {tps:>8.1f} {n:>8.4f}")
    print(f"\nNDCG@10 {m_ours['ndcg_at_10']:.4f} (reference {REFERENCE}); throughput {ratio:.2f}x sentence-transformers")
    claims = [claim("scifact_test_ndcg_at_10_minilm", round(m_ours["ndcg_at_10"], 6), f"{REFERENCE} +/- 0.001",
                    abs(m_ours["ndcg_at_10"] - REFERENCE) <= 0.001),
              claim("encode_throughput_vs_sentence_transformers", round(ratio, 3), ">= 0.95x", ratio >= 0.95)]
    out = write_results(__file__, {
        "queries": len(split), "documents": len(split.corpus), "batch_size": args.batch_size,
        "ours": {"seconds": ours_s, "texts_per_s": len(texts) / ours_s, **{k: m_ours[k] for k in ("ndcg_at_10", "recall_at_100")}},
        "sentence_transformers": {"seconds": st_s, "texts_per_s": len(texts) / st_s, **{k: m_st[k] for k in ("ndcg_at_10", "recall_at_100")}},
    }, claims)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
