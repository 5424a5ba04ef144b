"""A MiniLM expert trained on SciFact train with mined hard negatives, scored on SciFact test (NDCG@10).

One run, same data for everything:
  1. base all-MiniLM-L6-v2 on SciFact test (reference 0.6451);
  2. mining on the train split: one dense (the base model) and one BM25 negative per (query, positive), NV-Retriever
     filter at 0.95 of the positive's score, written as training shards (the Synthesize schema);
  3. sentence-transformers alone: full fine-tune, MultipleNegativesRankingLoss on (query, positive, dense negative),
     2 epochs, batch 32, lr 5e-5, warm-up 10% (what a user of sentence-transformers gets);
  4. stm-ray: ``train_experts`` on the shards (Ray Train, the default LoRA r=16/alpha=32 on all linear layers unless
     --full), 2 epochs, global batch 32, one hard negative per query drawn from the mined ones.

    python benchmarks/train_scifact.py [--scifact DIR] [--epochs 2] [--lr 3e-4] [--full] [--skip-st]

Writes benchmarks/results/train_scifact.json (work files under runs/bench/train_scifact/). Synthetic (LLM) negatives
come from the Synthesize stage; with --shards DIR the stm-ray expert trains on those shards instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import claim, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_REFERENCE = 0.6451
ST_REFERENCE = 0.687


def mine(args, work: Path, task_spec: str, split_train, split_test) -> dict:
    """Mined shards + the base model's test score (from the same corpus embedding)."""
    import pyarrow as pa

    from stm_ray.data.shards import write_shard
    from stm_ray.eval.evaluate import evaluate_split
    from stm_ray.modeling import Embedder
    from stm_ray.synth.mine import mine_bm25, mine_dense

    done = work / "mined.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    base = Embedder.from_pretrained("minilm")
    corpus_emb = base.encode_corpus(split_test.corpus, show_progress=True)
    base_res = evaluate_split(base, split_test, corpus_emb=corpus_emb, model_name="minilm")
    pos = {d: i for i, d in enumerate(split_train.corpus_ids)}
    rows_q, rows_pos = [], []
    for qi, qid in enumerate(split_train.query_ids):
        for did, rel in split_train.relevant.get(qid, {}).items():
            if rel > 0 and did in pos:
                rows_q.append(qi)
                rows_pos.append(pos[did])
    judged = [{pos[d] for d, r in split_train.relevant.get(split_train.query_ids[q], {}).items() if d in pos}
              for q in rows_q]
    queries = [split_train.queries[q] for q in rows_q]
    q_emb = base.encode_queries(queries)
    dense = mine_dense(q_emb, corpus_emb, [[p] for p in rows_pos], judged, depth=50, count=1, margin=0.95)
    bm25 = mine_bm25(queries, split_train.corpus, [[p] for p in rows_pos], judged, depth=50, count=1, margin=0.95)
    rows = []
    for i, (q, p) in enumerate(zip(rows_q, rows_pos)):
        negs, srcs = [], []
        for mined, src in ((dense, "mined-dense"), (bm25, "mined-bm25")):
            for j in mined.indices[i]:
                negs.append(split_train.corpus[j])
                srcs.append(src)
        rows.append({"query_id": split_train.query_ids[q], "query": split_train.queries[q],
                     "positive_id": split_train.corpus_ids[p], "positive": split_train.corpus[p], "negatives": negs,
                     "negative_sources": srcs, "instruction": "", "task": task_spec, "expert": "scifact"})
    write_shard(pa.Table.from_pylist(rows), work / "shards" / "part-00000.parquet")
    out = {"base_ndcg_at_10": base_res.ndcg_at_10, "pairs": len(rows), "queries": len(set(rows_q)),
           "dense_dropped_as_false_negative": dense.dropped_as_false_negative,
           "bm25_dropped_as_false_negative": bm25.dropped_as_false_negative,
           "rows_without_dense": sum(1 for m in dense.indices if not m),
           "rows_without_bm25": sum(1 for m in bm25.indices if not m), "mine_s": time.perf_counter() - t0}
    done.write_text(json.dumps(out, indent=2))
    return out


def st_baseline(args, work: Path, split_test) -> dict:
    """sentence-transformers alone: full fine-tune with MNRL on (anchor, positive, dense negative)."""
    done = work / "st.json"
    if done.is_file():
        return json.loads(done.read_text())
    import pyarrow.parquet as pq
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    from stm_ray.eval.evaluate import evaluate_split
    from stm_ray.modeling import Embedder
    from stm_ray.modeling.aliases import minilm_path

    t = pq.read_table(work / "shards" / "part-00000.parquet").to_pylist()
    data = [{"anchor": r["query"], "positive": r["positive"],
             "negative": next((n for n, s in zip(r["negatives"], r["negative_sources"]) if s == "mined-dense"), None)}
            for r in t]
    data = [d for d in data if d["negative"]]
    model = SentenceTransformer(minilm_path(), device="cpu")
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st-out"), num_train_epochs=args.epochs, per_device_train_batch_size=32,
        learning_rate=5e-5, warmup_ratio=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no",
        logging_steps=10, report_to="none", seed=13, use_cpu=True, dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=Dataset.from_list(data),
                                         loss=MultipleNegativesRankingLoss(model))
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    model.save(str(work / "st-model"))
    res = evaluate_split(Embedder.from_pretrained(str(work / "st-model")), split_test, show_progress=True)
    rep = {"ndcg_at_10": res.ndcg_at_10, "train_s": train_s, "rows": len(data),
           "samples_per_s": out.metrics.get("train_samples_per_second")}
    done.write_text(json.dumps(rep, indent=2))
    return rep


def ours(args, work: Path, split_test, shards: Path) -> dict:
    from stm_ray.config import load_config
    from stm_ray.eval.evaluate import evaluate_split
    from stm_ray.modeling import Embedder
    from stm_ray.ray_setup import init_local_ray
    from stm_ray.train import train_experts

    tag = "full" if args.full else "lora"
    done = work / f"ours-{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [f"run_dir={work / ('run-' + tag)}", "model.name_or_path=minilm", f"train.shards={shards}",
                 f"train.epochs={args.epochs}", "train.batch_size=32", "train.negatives_per_query=1",
                 f"train.learning_rate={args.lr}", "train.evaluate_dev=false", f"train.cpus_per_worker={os.cpu_count() or 2}",
                 "train.checkpoint_every=1000"]
    if args.full:
        overrides.append("train.lora=null")
    cfg = load_config(None, overrides)
    init_local_ray(num_cpus=os.cpu_count() or 2, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    t0 = time.perf_counter()
    [res] = train_experts(cfg)
    train_s = time.perf_counter() - t0
    ev = evaluate_split(Embedder.from_pretrained(res.path), split_test, show_progress=True)
    rep = {"ndcg_at_10": ev.ndcg_at_10, "train_s": train_s, "rows": res.rows, "steps": res.steps,
           "samples_per_s": res.samples_per_s, "final_loss": res.final_loss, "lora": not args.full, "lr": args.lr,
           }
    done.write_text(json.dumps(rep, indent=2))
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("STM_RAY_SCIFACT", str(ROOT.parent / "shared" / "data" / "scifact")))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4, help="stm-ray learning rate (LoRA default 3e-4; use 5e-5 with --full)")
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    ap.add_argument("--skip-st", action="store_true", help="do not run the sentence-transformers baseline")
    ap.add_argument("--shards", help="train the stm-ray expert on these shards (e.g. with synthetic negatives)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "train_scifact"))
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact}; pass --scifact DIR (a BEIR folder)", file=sys.stderr)
        return 2
    from stm_ray.data import load_task
    from stm_ray.utils import setup_logging

    setup_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = f"beir:{Path(args.scifact).resolve()}"
    task = load_task(spec)
    split_train, split_test = task.split("train"), task.split("test")
    mined = mine(args, work, spec, split_train, split_test)
    print(f"mined: {mined}")
    st = None if args.skip_st else st_baseline(args, work, split_test)
    print(f"sentence-transformers: {st}")
    me = ours(args, work, split_test, Path(args.shards) if args.shards else work / "shards")
    print(f"stm-ray: {me}")

    rows = [("all-MiniLM-L6-v2 (base)", mined["base_ndcg_at_10"], "", ""),
            ("sentence-transformers MNRL, full FT", st["ndcg_at_10"] if st else float("nan"),
             f"{st['train_s']:.0f}" if st else "", f"{st['samples_per_s'] or 0:.1f}" if st else ""),
            (f"stm-ray expert ({'full FT' if args.full else 'LoRA r=16'})", me["ndcg_at_10"], f"{me['train_s']:.0f}",
             f"{me['samples_per_s']:.1f}")]
    print(f"\n{'model':40s} {'NDCG@10':>8s} {'train s':>8s} {'samples/s':>10s}")
    for name, v, t, s in rows:
        print(f"{name:40s} {v:8.4f} {t:>8s} {s:>10s}")
    st_score = st["ndcg_at_10"] if st else ST_REFERENCE
    claims = [claim("expert NDCG@10 > base (SciFact test)", round(me["ndcg_at_10"], 4), f"> {mined['base_ndcg_at_10']:.4f}",
                    me["ndcg_at_10"] > mined["base_ndcg_at_10"]),
              claim("expert NDCG@10 vs sentence-transformers alone", round(me["ndcg_at_10"], 4), f">= {st_score:.4f}",
                    me["ndcg_at_10"] >= st_score)]
    out = write_results(__file__, {"task": "SciFact (BEIR) train -> test", "epochs": args.epochs, "mined": mined,
                                   "sentence_transformers": st, "stm_ray": me,
                                   "base_reference": BASE_REFERENCE, "st_reference_from_issue": ST_REFERENCE}, claims)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
