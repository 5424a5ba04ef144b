"""Training throughput: stm-ray's Ray Train trainer vs sentence-transformers' own trainer, and 2 workers vs 1.

Same model (all-MiniLM-L6-v2), same data (icd10 train pairs, one hard negative each: a random code of the same
chapter), same batch (32 queries, so 32 positives + 32 negatives per step), same number of steps, fp32 on CPU.
Throughput is steady-state training samples (queries) per second, timed per optimizer step after the first
few steps for every trainer alike (start-up is reported separately as wall time):

  A. sentence-transformers SentenceTransformerTrainer + MultipleNegativesRankingLoss, full fine-tune
  B. stm-ray, full fine-tune (train.lora=null), 1 Ray Train worker with all CPU threads
  C. sentence-transformers + MNRL with a peft LoRA adapter (r=16, alpha=32, all linear layers)
  D. stm-ray LoRA (the default), 1 worker with all threads
  E. stm-ray LoRA, 2 workers with half the threads each (same total CPU threads), in-batch negatives gathered

Goals (issue 7): B/A >= 1.0 and D/C >= 1.0 (at least as fast as sentence-transformers); E/D >= 0.9.

    python benchmarks/bench_train.py [--steps 40] [--batch-size 32]

Writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import claim, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIP = 3  # warm-up steps left out of the steady-state timing


def build_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    from stm_ray.data import load_task
    from stm_ray.data.task import doc_text

    task = load_task("icd10")
    docs = task.corpus.to_pylist()
    text = {d["_id"]: doc_text(d.get("title"), d.get("text")) for d in docs}
    by_chapter: dict[str, list[str]] = {}
    for d in docs:
        by_chapter.setdefault(d.get("chapter") or "", []).append(d["_id"])
    q = {r["_id"]: r for r in task.queries.to_pylist()}
    rng = random.Random(seed)
    rows = []
    for qid, rel in sorted(task.qrels_dict("train").items()):
        for did in rel:
            ch = by_chapter.get(q[qid].get("chapter") or "", list(text))
            neg = rng.choice(ch)
            if neg == did:
                continue
            rows.append({"query_id": qid, "query": q[qid]["text"], "positive_id": did, "positive": text[did],
                         "negatives": [text[neg]], "negative_sources": ["mined-bm25"], "instruction": "",
                         "task": "icd10", "expert": "bench"})
    rng.shuffle(rows)
    return rows[:n]


def run_st(rows: list[dict], steps: int, batch: int, lora: bool) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from stm_ray.modeling.aliases import minilm_path

    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.perf_counter()
    model = SentenceTransformer(minilm_path(), device="cpu")
    if lora:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="FEATURE_EXTRACTION",
                                     target_modules=["query", "key", "value", "dense"]))
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    data = Dataset.from_list([{"anchor": r["query"], "positive": r["positive"], "negative": r["negatives"][0]}
                              for r in rows])
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(ROOT / "runs" / "bench" / "st-train"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-4 if lora else 5e-5, warmup_ratio=0.1, save_strategy="no", logging_steps=1000,
        report_to="none", seed=13, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model), callbacks=[Timer()])
    trainer.train()
    wall = time.perf_counter() - t0
    dts = [b - a for a, b in zip(times[SKIP - 1:], times[SKIP:])]
    return {"samples_per_s": batch * len(dts) / sum(dts), "wall_s": wall, "steps": len(times)}


def run_ours(shards: Path, steps: int, batch: int, lora: bool, workers: int, run_dir: Path) -> dict:
    import json

    from stm_ray.config import load_config
    from stm_ray.train import train_experts

    threads = os.cpu_count() or 2
    overrides = [f"run_dir={run_dir}", "model.name_or_path=minilm", f"train.shards={shards}",
                 f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.num_workers={workers}",
                 f"train.cpus_per_worker={max(1, threads // workers)}", "train.evaluate_dev=false",
                 "train.checkpoint_every=100000", "train.lora.dropout=0.05",
                 f"train.learning_rate={1e-4 if lora else 5e-5}"]
    if not lora:
        overrides.append("train.lora=null")
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    [res] = train_experts(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    secs = json.loads((Path(res.path) / "metrics.json").read_text())["step_seconds"]
    dts = secs[SKIP:]
    return {"samples_per_s": batch * len(dts) / sum(dts), "wall_s": wall, "steps": res.steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "bench_train"))
    args = ap.parse_args()

    import shutil

    import pyarrow as pa

    from stm_ray.data.shards import write_shard
    from stm_ray.utils import init_local_ray, setup_logging

    setup_logging("WARNING")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = build_rows(args.steps * args.batch_size + args.batch_size)
    shards = work / "shards"
    write_shard(pa.Table.from_pylist(rows), shards / "part-00000.parquet")
    print(f"{len(rows)} icd10 training rows, batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPU threads")
    init_local_ray(num_cpus=os.cpu_count() or 2, object_store_memory=1 << 30,
                   runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})

    r: dict[str, dict] = {}
    r["A_st_full"] = run_st(rows, args.steps, args.batch_size, lora=False)
    r["B_ours_full_1w"] = run_ours(shards, args.steps, args.batch_size, False, 1, work / "B")
    r["C_st_lora"] = run_st(rows, args.steps, args.batch_size, lora=True)
    r["D_ours_lora_1w"] = run_ours(shards, args.steps, args.batch_size, True, 1, work / "D")
    r["E_ours_lora_2w"] = run_ours(shards, args.steps, args.batch_size, True, 2, work / "E")

    print(f"\n{'run':42s} {'samples/s':>10s} {'wall s':>8s}")
    names = {"A_st_full": "A sentence-transformers, full FT", "B_ours_full_1w": "B stm-ray, full FT, 1 worker",
             "C_st_lora": "C sentence-transformers, LoRA", "D_ours_lora_1w": "D stm-ray, LoRA, 1 worker",
             "E_ours_lora_2w": "E stm-ray, LoRA, 2 workers (same threads)"}
    for k, v in r.items():
        print(f"{names[k]:42s} {v['samples_per_s']:10.1f} {v['wall_s']:8.1f}")
    ba = r["B_ours_full_1w"]["samples_per_s"] / r["A_st_full"]["samples_per_s"]
    dc = r["D_ours_lora_1w"]["samples_per_s"] / r["C_st_lora"]["samples_per_s"]
    ed = r["E_ours_lora_2w"]["samples_per_s"] / r["D_ours_lora_1w"]["samples_per_s"]
    print(f"\nours/ST full FT {ba:.2f}x   ours/ST LoRA {dc:.2f}x   2 workers/1 worker {ed:.2f}x")
    claims = [claim("stm-ray / sentence-transformers samples/s, full fine-tune", round(ba, 3), ">= 1.0", ba >= 1.0),
              claim("stm-ray / sentence-transformers samples/s, LoRA", round(dc, 3), ">= 1.0", dc >= 1.0),
              claim("2 workers / 1 worker samples/s at the same CPU threads", round(ed, 3), ">= 0.9", ed >= 0.9)]
    out = write_results(__file__, {"steps": args.steps, "batch_size": args.batch_size, "runs": r,
                                   "ratios": {"full": ba, "lora": dc, "two_vs_one_worker": ed}}, claims)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
