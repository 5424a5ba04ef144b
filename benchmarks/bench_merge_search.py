"""Merge search: Optuna vs the paper's grid on the same experts; the best merge vs the best single expert.

One run, on the embedded icd10 task (all-MiniLM-L6-v2 base):
1. Training rows: ``max_rows`` (query, code) pairs of the train split with BM25-mined negatives (``stm-ray
   synthesize`` with ``synthetic_per_query=0``: no LLM, so the benchmark measures the search, not the generator).
2. Two LoRA experts by clinical area: ICD-10 chapters 1-11 (infections ... digestive) and 12-22 (skin ... external
   causes), trained with Ray Train at the same time.
3. The merge search (linear, the paper's weights {0, 0.1, ..., 0.9} per expert): ``grid`` (all 100 points) and
   ``optuna`` (``--optuna-trials``) on the same dev sets. Claim: Optuna reaches the grid's best dev score within 25%
   of the grid's trials.
4. Test NDCG@10 (full corpus) of the base, each expert and the Optuna winner. Claims: the merge beats or equals
   the best single expert on mean dev NDCG@10, and on test.

    .venv/bin/python benchmarks/bench_merge_search.py [--run-dir runs/bench_merge] [--max-rows 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import claim, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench_merge")
    ap.add_argument("--max-rows", type=int, default=2000, help="training pairs from icd10's train split")
    ap.add_argument("--optuna-trials", type=int, default=30)
    ap.add_argument("--dev-queries", type=int, default=200)
    ap.add_argument("--dev-corpus", type=int, default=3000)
    ap.add_argument("--test-queries", type=int, default=None, help="cap test queries (default: all)")
    args = ap.parse_args()

    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards
    from stm_ray.eval import evaluate_tasks
    from stm_ray.merge import merge_table, search_merge
    from stm_ray.ray_setup import init_local_ray
    from stm_ray.synth import synthesize
    from stm_ray.train import train_experts
    from stm_ray.utils import setup_logging

    setup_logging()
    run = Path(args.run_dir)
    base = [f"run_dir={run}", "data.tasks=[icd10]", "model.name_or_path=minilm", "synth.miners=[bm25]",
            "synth.synthetic_per_query=0", "synth.instruction_pool_size=0", f"synth.max_rows={args.max_rows}",
            "synth.expert_by=chapter", "synth.shard_size=500", "train.batch_size=32", "train.learning_rate=3e-4",
            "train.evaluate_dev=false", f"search.dev_max_queries={args.dev_queries}",
            f"search.dev_corpus_size={args.dev_corpus}", "search.cpus_per_trial=2", "merge.methods=[linear]"]
    init_local_ray()
    timings = {}
    t = time.perf_counter()
    synthesize(load_config(None, base), show_progress=False)
    timings["synthesize_s"] = time.perf_counter() - t

    tags = sorted(set(read_shards(str(run / "synth")).column("expert").to_pylist()))
    chapter = {tag: int(tag.rsplit("chapter", 1)[1]) for tag in tags}
    groups = {"ch01-11": [t for t in tags if chapter[t] <= 11], "ch12-22": [t for t in tags if chapter[t] > 11]}
    experts = "{" + ",".join(f"{k}: [{','.join(v)}]" for k, v in groups.items()) + "}"
    t = time.perf_counter()
    train_experts(load_config(None, [*base, f"train.experts={experts}"]), show_progress=False)
    timings["train_s"] = time.perf_counter() - t

    runs = {}
    for searcher in ("grid", "optuna"):
        cfg = load_config(None, [*base, f"merge.searcher={searcher}", f"merge.num_samples={args.optuna_trials}"])
        t = time.perf_counter()
        runs[searcher] = search_merge(cfg, show_progress=False)
        timings[f"{searcher}_s"] = time.perf_counter() - t
        print(f"\n{searcher}:\n{merge_table(runs[searcher])}")
    grid, opt = runs["grid"], runs["optuna"]
    grid_best = grid.dev["ndcg_at_10"]
    reach = next((r["trial"] for r in opt.trials if "error" not in r and r["ndcg_at_10"] >= grid_best - 1e-9), None)
    grid_trials = len([r for r in grid.trials if "error" not in r])

    cfg = load_config(None, base)
    test = {}
    for name, path in [("base", "minilm"), *((n, str(run / "experts" / n)) for n in groups), ("merged", opt.path)]:
        res = evaluate_tasks(cfg, model=path, max_queries=args.test_queries)[0]
        test[name] = {"ndcg_at_10": res.ndcg_at_10, "recall_at_10": res.scores["recall_at_10"],
                      "queries": res.num_queries, "documents": res.num_documents}
    best_single = max(groups, key=lambda n: test[n]["ndcg_at_10"])
    best_dev_single = max(opt.experts_dev, key=lambda n: opt.experts_dev[n]["ndcg_at_10"])

    print("\n| model | mean dev NDCG@10 | test NDCG@10 |\n|---|---|---|")
    print(f"| base | {opt.base_dev['ndcg_at_10']:.4f} | {test['base']['ndcg_at_10']:.4f} |")
    for n in groups:
        print(f"| expert {n} | {opt.experts_dev[n]['ndcg_at_10']:.4f} | {test[n]['ndcg_at_10']:.4f} |")
    print(f"| merged (optuna: {opt.method} {opt.weights}) | {opt.dev['ndcg_at_10']:.4f} | {test['merged']['ndcg_at_10']:.4f} |")
    print("\n| searcher | trials | best dev NDCG@10 | best point | wall s |\n|---|---|---|---|---|")
    for k, r in runs.items():
        print(f"| {k} | {len(r.trials)} | {r.dev['ndcg_at_10']:.4f} | {r.method} {r.weights} | {timings[f'{k}_s']:.0f} |")
    print(f"\nOptuna reached the grid's best ({grid_best:.4f}) at trial {reach} of {grid_trials} grid trials")

    ratio = reach / grid_trials if reach else None
    claims = [
        claim("Optuna trials to reach the grid's best dev score, as a fraction of the grid's trials",
              ratio if ratio is not None else float("inf"), "<= 0.25", ratio is not None and ratio <= 0.25),
        claim("merged vs best single expert, mean dev NDCG@10", opt.dev["ndcg_at_10"],
              f">= {opt.experts_dev[best_dev_single]['ndcg_at_10']:.4f} ({best_dev_single})",
              opt.dev["ndcg_at_10"] >= opt.experts_dev[best_dev_single]["ndcg_at_10"]),
        claim("merged vs best single expert, test NDCG@10", test["merged"]["ndcg_at_10"],
              f">= {test[best_single]['ndcg_at_10']:.4f} ({best_single})",
              test["merged"]["ndcg_at_10"] >= test[best_single]["ndcg_at_10"]),
    ]
    figures = {"config": {"max_rows": args.max_rows, "experts": groups, "optuna_trials": args.optuna_trials,
                          "dev_queries": args.dev_queries, "dev_corpus": args.dev_corpus, "methods": ["linear"],
                          "weight_grid": cfg.merge.weight_grid},
               "timings_s": timings, "grid_best": grid_best, "optuna_reached_at": reach, "grid_trials": grid_trials,
               "searches": {k: {"method": r.method, "weights": r.weights, "dev": r.dev, "trials": r.trials}
                            for k, r in runs.items()},
               "dev": {"base": opt.base_dev, "experts": opt.experts_dev, "merged": opt.dev}, "test": test}
    out = write_results(__file__, figures, claims)
    print("\n" + "\n".join(f"- {c['name']}: {c['value']} (goal {c['goal']}): {'met' if c['met'] else 'NOT met'}"
                           for c in claims))
    print(f"wrote {out}")
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
