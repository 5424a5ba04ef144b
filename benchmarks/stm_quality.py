"""The recipe's quality: base vs experts vs merged, NDCG@10 on the test split of SciFact and icd10.

The whole loop (``stm_ray.pipeline.run_pipeline``, what ``stm-ray run`` does) over two data sources:

  * SciFact (BEIR, CC BY-NC; read from --scifact, never copied): its train split minus a 10% dev hold-out
    (SciFact has no dev split) trains the SciFact expert; test = 300 queries, 5,183 abstracts;
  * icd10 (embedded ICD-10-CM clinical coding): --icd10-rows train pairs; test = 1,246 queries, 46,881 codes.

Synthesize mines BM25 + dense negatives for every pair and has SmolLM2-135M-Instruct (vLLM) write one more for
--synthetic-rows pairs per task; Train fine-tunes one all-MiniLM-L6-v2 expert per source (Ray Train, side by side);
the instruction search and the merge search (Ray Tune + mergekit) score on the dev sets; evaluate scores base,
each expert and the merged model on both test sets. Goals (issue 8):

  1. merged > base on every task;
  2. merged >= the best single expert on the mean over tasks;
  3. SciFact test >= 0.700 (base 0.6451; a plain sentence-transformers fine-tune reaches 0.687).

    python benchmarks/stm_quality.py [--scifact DIR] [--run-dir runs/bench/stm_quality] [--lora]

The run directory resumes: a rerun continues where a killed one stopped and a finished one only rewrites the
table. Writes benchmarks/results/stm_quality.json and <run-dir>/report.md.
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
DEFAULT_SCIFACT = os.environ.get("STM_RAY_SCIFACT", str(ROOT.parent / "shared" / "data" / "scifact"))
BASE_REFERENCE = 0.6451
ST_REFERENCE = 0.687
SCIFACT_GOAL = 0.700


def build_config(args):
    from stm_ray.config import load_config

    scifact = f"beir:{Path(args.scifact).resolve()}"
    overrides = [
        f"run_dir={args.run_dir}",
        f"data.tasks=[{scifact},icd10]",
        "model.name_or_path=minilm", "model.batch_size=64",
        "synth.generator=smollm2", "synth.expert_by=task", f"synth.max_rows={args.icd10_rows}",
        f"synth.synthetic_max_rows={args.synthetic_rows}", "synth.max_new_tokens=96", "synth.instruction_pool_size=4",
        f"train.epochs={args.epochs}", "train.batch_size=32", f"train.learning_rate={args.lr}",
        "search.num_samples=6", "search.dev_max_queries=100", "search.dev_corpus_size=1500", "search.cpus_per_trial=2",
        "merge.methods=[linear,ties,task_arithmetic]", "merge.searcher=optuna", f"merge.num_samples={args.merge_trials}",
    ]
    if not args.lora:
        overrides.append("train.lora=null")
    return load_config(None, overrides), scifact


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=DEFAULT_SCIFACT, help="BEIR SciFact folder (default ../shared/data/scifact "
                                                              "or $STM_RAY_SCIFACT)")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench" / "stm_quality"))
    ap.add_argument("--icd10-rows", type=int, default=1500, help="train pairs per task (SciFact has ~830: all of them)")
    ap.add_argument("--synthetic-rows", type=int, default=64, help="pairs per task that get an LLM negative")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate (5e-5 full fine-tune; use ~3e-4 with --lora)")
    ap.add_argument("--lora", action="store_true", help="LoRA experts (r=16) instead of full fine-tunes")
    ap.add_argument("--merge-trials", type=int, default=16)
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact} (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/); "
              "pass --scifact DIR or set STM_RAY_SCIFACT", file=sys.stderr)
        return 2

    from stm_ray.pipeline import run_pipeline
    from stm_ray.report import ndcg_table
    from stm_ray.tables import format_table
    from stm_ray.utils import setup_logging

    setup_logging("INFO")

    cfg, scifact = build_config(args)
    t0 = time.perf_counter()
    manifest = run_pipeline(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    tasks, table, split = ndcg_table(Path(cfg.run_dir))
    names = {scifact: "SciFact", "icd10": "icd10"}
    base, merged = table["base"], table["merged"]
    experts = {lb: r for lb, r in table.items() if lb.startswith("expert-")}
    best_name, best = max(experts.items(), key=lambda kv: kv[1]["mean"])
    rows = [{"model": lb, **{names[t]: r[t] for t in tasks}, "mean": r["mean"]} for lb, r in table.items()]
    print("\nNDCG@10, test split:")
    print(format_table(rows, ["model", *[names[t] for t in tasks], "mean"]))

    gains = {names[t]: merged[t] - base[t] for t in tasks}
    claims = [
        claim("merged - base, NDCG@10, worst task (" + min(gains, key=gains.get) + ")", round(min(gains.values()), 4),
              "> 0 on every task", min(gains.values()) > 0),
        claim(f"merged - best single expert ({best_name}), mean NDCG@10", round(merged["mean"] - best["mean"], 4),
              ">= 0", merged["mean"] >= best["mean"]),
        claim("merged SciFact test NDCG@10", round(merged[scifact], 4),
              f">= {SCIFACT_GOAL} (base {BASE_REFERENCE}, sentence-transformers fine-tune {ST_REFERENCE})",
              merged[scifact] >= SCIFACT_GOAL),
    ]
    stages = manifest["stages"]
    merge = stages["merge"].get("counts") or {}
    figures = {
        "config": cfg.model_dump(mode="json", exclude={"serve", "run_dir", "staging_dir"}),
        "scifact_folder": "../shared/data/scifact (not in the repo)",
        "ndcg_at_10": {lb: {names[t]: r[t] for t in tasks} | {"mean": r["mean"]} for lb, r in table.items()},
        "merge": {k: merge.get(k) for k in ("method", "weights", "density", "dev", "base_dev", "experts_dev",
                                            "trials", "gain_over_best_single")},
        "experts": (stages["train"].get("counts") or {}).get("experts"),
        "synthesis": {k: (stages["synthesize"].get("counts") or {}).get(k) for k in (
            "rows", "synthetic_generated", "gen_tokens", "tokens_per_s", "negatives_by_source", "drops_by_reason")},
        "stage_seconds": {n: s.get("seconds") for n, s in stages.items()},
        "this_invocation_s": round(wall, 1),
        "references": {"base_scifact": BASE_REFERENCE, "sentence_transformers_scifact": ST_REFERENCE},
    }
    # no paths of this machine in the committed results: the SciFact folder and the run dir are named, not given
    figures = json.loads(json.dumps(figures).replace(str(Path(cfg.run_dir).resolve()), "RUN_DIR")
                         .replace(str(Path(args.scifact).resolve()), "SCIFACT"))
    out = write_results(__file__, figures, claims)
    print()
    print(format_table([{**c, "value": c["value"], "met": "yes" if c["met"] else "NO"} for c in claims],
                       ["name", "value", "goal", "met"]))
    print(f"\nresults: {out}\nreport: {Path(cfg.run_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
