"""Distillation on SciFact and icd10: InfoNCE only vs InfoNCE + reranker distillation vs InfoNCE + LLM-feedback
distillation, the same rows and steps, with the teacher's own NDCG@10 beside them.

The product's own stages on a local Ray:

1. ``<work>/base``: ``synthesize`` (BM25 + dense-mined negatives, ``--rows`` train pairs per task) and, for the
   teacher's own figure, ``rerank`` with the teacher reranker over MiniLM's top ``--k`` (``--teacher-queries`` test
   queries per task).
2. ``<work>/<variant>`` for infonce, reranker, llm: ``teacher`` (none; the cross-encoder's logits; SmolLM2's mean
   log-probability of the query given each candidate, from vLLM prompt log-probabilities) then ``train``: one
   all-MiniLM-L6-v2 expert (full fine-tune) on the rows of both tasks (same-task batches), ``train.distill`` =
   ``--loss`` with weight ``--weight`` for the two teachers.
3. ``evaluate`` (mteb-format files in ``<work>/base/eval``): base and the three experts on both test splits
   (icd10: chapters 9-12 by default, ``--icd10``).

The teacher reranker is a cross-encoder folder (``--teacher``; by default the one ``benchmarks/rerank.py`` trained
from the same recipe's shards, its NDCG@10 is measured here again). Teacher temperatures are fixed a priori, not
searched: 1.0 for the cross-encoder's logits, ``--llm-temperature`` 0.1 for mean token log-probabilities (whose
differences between candidates are about ten times smaller).

    python benchmarks/distill.py [--scifact DIR] [--teacher FOLDER] [--rows 128] [--loss kl]

Goal (issue "Distillation"): a distilled expert >= the InfoNCE-only expert + 0.01 NDCG@10 on the mean of the two
tasks. Writes benchmarks/results/distill.json.
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

VARIANTS = ("infonce", "reranker", "llm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("STM_RAY_SCIFACT", str(ROOT.parent / "shared" / "data" / "scifact")))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "distill"))
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "bench" / "rerank" / "rerankers" / "cross-encoder"),
                    help="the teacher reranker folder (default: the cross-encoder of benchmarks/rerank.py)")
    ap.add_argument("--icd10", default="icd10:9,10,11,12", help="the icd10 task (chapters 9-12: 4,584 codes; plain "
                                                                  "'icd10' has 46,881, ten times the encoding)")
    ap.add_argument("--rows", type=int, default=128, help="train (query, positive) rows per task (synth.max_rows)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--negatives", type=int, default=2, help="hard negatives per query in a training group")
    ap.add_argument("--loss", default="kl", choices=["kl", "stabilized", "margin_mse"])
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--llm-temperature", type=float, default=0.1)
    ap.add_argument("--llm-chars", type=int, default=600, help="characters of a candidate in the LLM prompt")
    ap.add_argument("--k", type=int, default=30, help="candidates the teacher reranks for its own NDCG@10")
    ap.add_argument("--teacher-queries", type=int, default=100)
    ap.add_argument("--queries", type=int, default=None, help="test queries per task for the experts (None = all)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the training worker")
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact}; pass --scifact DIR (a BEIR folder)", file=sys.stderr)
        return 2
    if not Path(args.teacher).is_dir():
        print(f"no teacher reranker at {args.teacher}: run benchmarks/rerank.py first, or pass --teacher FOLDER",
              file=sys.stderr)
        return 2

    import pyarrow.compute as pc

    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards
    from stm_ray.eval import evaluate_models
    from stm_ray.pipeline import run_pipeline
    from stm_ray.tables import format_table
    from stm_ray.utils import setup_logging

    setup_logging("INFO")
    t0 = time.perf_counter()
    work = Path(args.work)
    sci = f"beir:{Path(args.scifact).resolve()}"
    tasks = [sci, args.icd10]
    names = {sci: "scifact", args.icd10: "icd10"}
    teacher_spec = [{"name": "teacher", "kind": "cross-encoder", "model": str(Path(args.teacher).resolve()),
                     "train": False}]
    common = [f"data.tasks={json.dumps(tasks)}", "model.name_or_path=minilm"]
    base_cfg = load_config(None, [f"run_dir={work / 'base'}", *common, f"synth.max_rows={args.rows}",
                                  "synth.synthetic_per_query=0", "synth.instruction_pool_size=0",
                                  f"rerank.rerankers={json.dumps(teacher_spec)}", "rerank.retriever=base",
                                  f"rerank.top_k={args.k}", f"rerank.max_queries={args.teacher_queries}",
                                  "rerank.score_batch_size=16"]
                           + ([f"data.max_queries={args.queries}"] if args.queries else []))
    m = run_pipeline(base_cfg, stages=["synthesize", "rerankers", "rerank"], show_progress=False)
    st = m["stages"]
    teacher_ndcg = st["rerank"]["counts"]["ndcg_at_10"]
    shards = work / "base" / "synth"
    table = read_shards(shards)
    tags = sorted(pc.unique(table.column("expert")).to_pylist())

    train = [f"train.shards={shards}", f"train.experts={json.dumps({'expert': tags})}", "train.lora=null",
             f"train.learning_rate={args.lr}", f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
             f"train.negatives_per_query={args.negatives}", f"train.cpus_per_worker={args.cpus}",
             "train.evaluate_dev=false", "train.checkpoint_every=1000"]
    teachers = {
        "infonce": [],
        "reranker": ["teacher.kind=reranker", f"teacher.reranker={Path(args.teacher).resolve()}",
                     f"train.distill.loss={args.loss}", f"train.distill.weight={args.weight}",
                     "train.distill.teacher_temperature=1.0"],
        "llm": ["teacher.kind=llm", f"teacher.max_document_chars={args.llm_chars}", "synth.max_model_len=512",
                f"train.distill.loss={args.loss}", f"train.distill.weight={args.weight}",
                f"train.distill.teacher_temperature={args.llm_temperature}"],
    }
    experts, stage_s, teacher_counts, train_counts = {}, {}, {}, {}
    for v in VARIANTS:
        cfg = load_config(None, [f"run_dir={work / v}", *common, *train, *teachers[v]])
        stages = ["teacher", "train"] if teachers[v] else ["train"]
        mv = run_pipeline(cfg, stages=stages, show_progress=False)["stages"]
        [(_, res)] = mv["train"]["counts"]["experts"].items()
        experts[v] = res["path"]
        train_counts[v] = {k: res.get(k) for k in ("rows", "steps", "final_loss", "samples_per_s", "wall_s")}
        stage_s[v] = {s: mv[s].get("seconds") for s in stages}
        if "teacher" in stages:
            teacher_counts[v] = {k: mv["teacher"]["counts"].get(k) for k in ("rows", "rows_scored", "pairs",
                                                                            "pairs_failed", "pairs_per_s", "seconds")}
    ev = evaluate_models(base_cfg, {"base": "minilm", **{f"expert-{v}": p for v, p in experts.items()}},
                         show_progress=False)["ndcg_at_10"]

    rows = [{"model": label, **{names[t]: round(sc[t], 4) for t in tasks}, "mean": round(sc["mean"], 4)}
            for label, sc in ev.items()]
    rows.append({"model": f"teacher: MiniLM top {args.k} + cross-encoder ({args.teacher_queries} queries)",
                 **{names[t]: round(teacher_ndcg["rerank-teacher"][t], 4) for t in tasks},
                 "mean": round(teacher_ndcg["rerank-teacher"]["mean"], 4)})
    rows.append({"model": f"MiniLM alone, same {args.teacher_queries} queries",
                 **{names[t]: round(teacher_ndcg["retriever"][t], 4) for t in tasks},
                 "mean": round(teacher_ndcg["retriever"]["mean"], 4)})
    print("\nNDCG@10, test splits")
    print(format_table(rows, list(rows[0])))
    plain = ev["expert-infonce"]["mean"]
    claims = [claim(f"{v}-distilled expert - InfoNCE-only expert, mean NDCG@10 (scifact, icd10)",
                    round(ev[f"expert-{v}"]["mean"] - plain, 4), ">= 0.01", ev[f"expert-{v}"]["mean"] - plain >= 0.01)
              for v in ("reranker", "llm")]
    figures = {"ndcg_at_10": {label: {names.get(t, t): v for t, v in sc.items()} for label, sc in ev.items()},
               "teacher_ndcg_at_10": {label: {names.get(t, t): v for t, v in sc.items()}
                                      for label, sc in teacher_ndcg.items()},
               "teacher_stage": teacher_counts, "training": train_counts, "stage_seconds": stage_s,
               "rows_per_task": {names.get(t, t): int(pc.sum(pc.equal(table.column("task"), t)).as_py() or 0)
                                 for t in tasks},
               "settings": vars(args) | {"work": "runs/bench/distill", "teacher": "rerank.py's cross-encoder"
                                         if args.teacher == ap.get_default("teacher") else args.teacher},
               "wall_s": round(time.perf_counter() - t0, 1)}
    return finish(__file__, figures, claims)


if __name__ == "__main__":
    raise SystemExit(main())
