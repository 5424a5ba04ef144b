"""Reranking on SciFact and icd10: the retriever alone vs + a cross-encoder vs + a SmolLM2 pointwise LLM reranker.

Both rerankers are trained only on what `stm-ray synthesize` writes from the train splits (queries, positives,
BM25/dense-mined and LLM-written hard negatives), through the product's own stages: ``run_pipeline(stages=
["synthesize", "rerankers", "rerank"])`` on a local Ray, then the rerank stage's files are read back. The
retriever is all-MiniLM-L6-v2 (``rerank.retriever=base``). Seconds per query at k=100: each reranker scores 100
SciFact abstracts (a fixed random sample) for each of a few test queries.

    python benchmarks/rerank.py [--scifact DIR] [--k 30] [--queries 300] [--rows 1024] [--steps 64] [--batch 16]

Goals (issue "Rerankers"): reranking >= retriever + 0.02 NDCG@10 on both tasks; SciFact retrieve + rerank >= 0.75.
Writes benchmarks/results/rerank.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import claim, finish  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("STM_RAY_SCIFACT", str(ROOT.parent / "shared" / "data" / "scifact")))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "rerank"))
    ap.add_argument("--k", type=int, default=30, help="candidates reranked per query for the NDCG@10 figures")
    ap.add_argument("--timing-k", type=int, default=100)
    ap.add_argument("--timing-queries", type=int, default=10)
    ap.add_argument("--queries", type=int, default=300, help="test queries per task (SciFact has 300)")
    ap.add_argument("--synth-rows", type=int, default=600, help="(query, positive) rows synthesized per task")
    ap.add_argument("--llm-rows", type=int, default=64, help="rows per task that get an LLM-written negative")
    ap.add_argument("--rows", type=int, default=1024, help="training rows per reranker (sampled from the shards)")
    ap.add_argument("--steps", type=int, default=64, help="LLM reranker steps (rerank.max_steps)")
    ap.add_argument("--ce-steps", type=int, default=256, help="cross-encoder steps (its spec's max_steps)")
    ap.add_argument("--ce-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--tasks", default="scifact,icd10", help="comma-separated subset of scifact,icd10 to rerank")
    ap.add_argument("--reuse-shards", action="store_true", help="skip the synthesize stage (its shards are there)")
    ap.add_argument("--max-length", type=int, default=256, help="cross-encoder tokens per (query, document)")
    ap.add_argument("--llm-max-length", type=int, default=192, help="LLM reranker tokens per prompt")
    ap.add_argument("--micro-batch", type=int, default=4, help="groups per forward/backward (memory)")
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact}; pass --scifact DIR (a BEIR folder)", file=sys.stderr)
        return 2

    from stm_ray.config import load_config
    from stm_ray.pipeline import run_pipeline
    from stm_ray.rerank.train import current_rerankers
    from stm_ray.tables import format_table
    from stm_ray.utils import setup_logging

    setup_logging("INFO")
    sci = f"beir:{Path(args.scifact).resolve()}"
    wanted = set(args.tasks.split(","))
    tasks = [t for t, n in ((sci, "scifact"), ("icd10", "icd10")) if n in wanted]
    specs = [{"name": "cross-encoder", "kind": "cross-encoder", "model": "minilm", "learning_rate": args.ce_lr,
              "max_length": args.max_length, "max_steps": args.ce_steps},
             {"name": "smollm2", "kind": "llm", "model": "smollm2", "learning_rate": 2e-4,
              "max_length": args.llm_max_length, "lora": {"r": 16, "alpha": 32, "dropout": 0.05}}]
    overrides = [f"run_dir={args.work}", f"data.tasks={json.dumps(tasks)}", "model.name_or_path=minilm",
                 f"synth.max_rows={args.synth_rows}", f"synth.synthetic_max_rows={args.llm_rows}",
                 f"rerank.rerankers={json.dumps(specs)}", f"rerank.max_rows={args.rows}", "rerank.epochs=8",
                 f"rerank.max_steps={args.steps}", f"rerank.batch_size={args.batch}",
                 f"rerank.negatives_per_query={args.negatives}", "rerank.retriever=base", f"rerank.top_k={args.k}",
                 f"rerank.max_queries={args.queries}", "rerank.score_batch_size=16",
                 f"rerank.micro_batch={args.micro_batch}"]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    stages = ["rerankers", "rerank"] if args.reuse_shards else ["synthesize", "rerankers", "rerank"]
    manifest = run_pipeline(cfg, stages=stages, show_progress=False)
    st = manifest["stages"]
    table = st["rerank"]["counts"]["ndcg_at_10"]
    trained = st["rerankers"]["counts"]["rerankers"]

    # seconds per query at k=100 (the figure): each reranker scores timing_k SciFact abstracts for each of a
    # few test queries (a fixed sample of the corpus: the cost depends on the texts' lengths, not on the ranking)
    import numpy as np

    from stm_ray.data import load_task
    from stm_ray.rerank.model import load_reranker

    sp = load_task(sci).split("test", max_queries=args.timing_queries)
    rng = np.random.default_rng(13)
    cand = [[sp.corpus[j] for j in rng.choice(len(sp.corpus), size=args.timing_k, replace=False)] for _ in sp.queries]
    spq = {}
    for name, path in current_rerankers(cfg).items():
        model = load_reranker(path, batch_size=16)
        t1 = time.perf_counter()
        for q, docs in zip(sp.queries, cand):
            model.score(q, docs)
        spq[name] = (time.perf_counter() - t1) / len(sp.queries)
    stage_spq = st["rerank"]["counts"].get("seconds_per_query") or {}

    names = {sci: "scifact", "icd10": "icd10"}
    rows = []
    for label, scores in table.items():
        rows.append({"model": "MiniLM retriever alone" if label == "retriever" else f"+ {label.removeprefix('rerank-')}",
                     **{names[t]: scores.get(t) for t in tasks}, "mean": scores.get("mean"),
                     f"s/query k={args.timing_k}": spq.get(label.removeprefix("rerank-"), "")})
    print(f"\nNDCG@10, test split ({args.queries} queries per task at most), top {args.k} of the retriever reranked")
    print(format_table(rows, list(rows[0])))

    ret = table["retriever"]
    claims = []
    for label in [lb for lb in table if lb != "retriever"]:
        for t in tasks:
            gain = table[label][t] - ret[t]
            claims.append(claim(f"{names[t]}: {label} - retriever NDCG@10", round(gain, 4), ">= 0.02", gain >= 0.02))
    if sci in tasks:
        best_sci = max(table[lb][sci] for lb in table if lb != "retriever")
        claims.append(claim("scifact: retrieve + best reranker NDCG@10", round(best_sci, 4), ">= 0.75",
                            best_sci >= 0.75))
    figures = {"ndcg_at_10": {lb: {names.get(t, t): v for t, v in sc.items()} for lb, sc in table.items()},
               "seconds_per_query": {"k": args.timing_k, "queries": args.timing_queries, **spq,
                                     f"in the rerank stage (k={args.k}, incl. tokenization)": stage_spq},
               "rerankers": {n: {k: v for k, v in r.items() if k in ("kind", "rows", "steps", "final_loss",
                                                                    "queries_per_s", "wall_s", "peak_memory_gib")}
                             for n, r in trained.items()},
               "stage_seconds": {n: st[n].get("seconds") for n in stages},
               "synthesis": {k: v for k, v in (st["synthesize"].get("counts") or {}).items()
                             if k in ("rows", "negatives", "synthetic", "rejected", "seconds")},
               "settings": vars(args) | {"work": "runs/bench/rerank"}, "wall_s": time.perf_counter() - t0}
    return finish(__file__, figures, claims)


if __name__ == "__main__":
    raise SystemExit(main())
