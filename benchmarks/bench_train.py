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

    python benchmarks/bench_train.py [--steps 40] [--batch-size 32] [--profile]

Writes benchmarks/results/bench_train.json. ``--profile`` runs A-D once more under py-spy (sampling the training
process's Python stacks, 50 Hz, from the fourth step for 30 s: this process for sentence-transformers, the Ray
Train worker for stm-ray) and adds a per-step breakdown (forward, backward, optimizer, tokenization, data, other;
share of samples times the mean step time) to the results JSON: where the per-step gap between the trainers is.
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


PHASES = (  # first match wins, tested on the whole stack (root to leaf) of a sample
    ("backward", ("run_backward", "backward (torch/", "torch/autograd/")),
    ("optimizer", ("torch/optim/", "clip_grad", "scheduler", "zero_grad")),
    ("tokenize", ("tokeniz",)),
    ("forward", ("forward (", "_call_impl", "_wrapped_call_impl")),
    ("data", ("dataloader", "collate", "datasets/", "pyarrow", "fetch (", "sampler")),
)


def phase_of(stack: str) -> str:
    for name, marks in PHASES:
        if any(m in stack for m in marks):
            return name
    return "other"


class Spy:
    """py-spy on a process: ``start(pid)`` records ``seconds`` of Python stacks (nonblocking: the process is not
    paused) into collapsed form; ``breakdown()`` gives each phase's share of the samples of the training thread(s)."""

    def __init__(self, out: Path, seconds: int = 30, rate: int = 50) -> None:
        self.out, self.seconds, self.rate, self.proc = out, seconds, rate, None

    def start(self, pid: int) -> None:
        import shutil
        import subprocess

        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(self.seconds), "--rate",
                                      str(self.rate), "--format", "raw", "--nonblocking", "--threads", "-o",
                                      str(self.out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def breakdown(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.wait(self.seconds + 60)
        per_thread: dict[str, dict[str, int]] = {}
        for line in self.out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            thread = stack.split(";", 1)[0]  # --threads: the first frame names the thread
            phases, phase = per_thread.setdefault(thread, {}), phase_of(stack)
            phases[phase] = phases.get(phase, 0) + int(n)
        if not per_thread:
            return {"samples": 0, "share": {}}
        # the training thread is the busiest one (Ray's and the loaders' helper threads are mostly idle)
        counts = max(per_thread.values(), key=lambda c: sum(c.values()))
        total = sum(counts.values()) or 1
        return {"samples": total, "threads_seen": len(per_thread),
                "share": {k: round(v / total, 4) for k, v in sorted(counts.items())}}


def run_st(rows: list[dict], steps: int, batch: int, lora: bool, spy: Spy | None = None) -> dict:
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
            if spy is not None and len(times) == SKIP + 1:
                spy.start(os.getpid())

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
    out = {"samples_per_s": batch * len(dts) / sum(dts), "wall_s": wall, "steps": len(times)}
    if spy is not None:
        out["profile"] = {**spy.breakdown(), "step_s": sum(dts) / len(dts)}
    return out


def _spy_on_train_worker(spy: Spy, batch: int) -> None:
    """Start ``spy`` on the Ray Train worker once it has done SKIP steps (estimated: it appears, then ~SKIP steps
    at the expected pace)."""
    import threading

    import psutil

    def watch() -> None:
        t0 = time.time()
        while time.time() - t0 < 600:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])):
                    time.sleep(25 + SKIP * batch / 15)  # model load + warm-up steps at ~15 samples/s
                    spy.start(p.info["pid"])
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def run_ours(shards: Path, steps: int, batch: int, lora: bool, workers: int, run_dir: Path,
             spy: Spy | None = None) -> dict:
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
    if spy is not None:
        _spy_on_train_worker(spy, batch)
    t0 = time.perf_counter()
    [res] = train_experts(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    secs = json.loads((Path(res.path) / "metrics.json").read_text())["step_seconds"]
    dts = secs[SKIP:]
    out = {"samples_per_s": batch * len(dts) / sum(dts), "wall_s": wall, "steps": res.steps}
    if spy is not None:
        out["profile"] = {**spy.breakdown(), "step_s": sum(dts) / len(dts)}
    return out


def merge_profile(profile: dict) -> Path:
    """Put a --profile-only run's breakdown into results/bench_train.json (its date recorded; the file's claims and
    throughput figures stay those of the last full run)."""
    import datetime as dt
    import json

    from _common import RESULTS, scrub_paths

    from stm_ray.utils import atomic_write_text

    out = RESULTS / "bench_train.json"
    data = json.loads(out.read_text()) if out.is_file() else {"script": Path(__file__).name, "figures": {}, "claims": []}
    data["figures"]["profile"] = scrub_paths(profile)
    data["figures"]["profile_measured"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "bench_train"))
    ap.add_argument("--profile", action="store_true", help="also run A-D under py-spy: per-step phase breakdown")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the profile (A-D under py-spy, ~8 min): added to results/bench_train.json as "
                         "'profile', with its own date, next to the last full run's claims")
    args = ap.parse_args()

    import shutil

    import pyarrow as pa

    from stm_ray.data.shards import write_shard
    from stm_ray.ray_setup import init_local_ray
    from stm_ray.utils import setup_logging

    setup_logging("WARNING")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = build_rows(args.steps * args.batch_size + args.batch_size)
    shards = work / "shards"
    write_shard(pa.Table.from_pylist(rows), shards / "part-00000.parquet")
    print(f"{len(rows)} icd10 training rows, batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPU threads")
    init_local_ray(num_cpus=os.cpu_count() or 2, object_store_memory=1 << 30,
                   runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})

    profile: dict[str, dict] = {}
    if args.profile or args.profile_only:
        spies = {k: Spy(work / f"{k}.spy.txt") for k in ("A", "B", "C", "D")}
        profile["A_st_full"] = run_st(rows, args.steps, args.batch_size, False, spies["A"])
        profile["B_ours_full_1w"] = run_ours(shards, args.steps, args.batch_size, False, 1, work / "pB", spies["B"])
        profile["C_st_lora"] = run_st(rows, args.steps, args.batch_size, True, spies["C"])
        profile["D_ours_lora_1w"] = run_ours(shards, args.steps, args.batch_size, True, 1, work / "pD", spies["D"])
        phases = [p for p, _ in PHASES] + ["other"]
        print(f"\nper-step breakdown under py-spy (ms per step; share of the training thread's samples)\n"
              f"{'run':16s} {'step ms':>8s}" + "".join(f"{p:>11s}" for p in phases))
        for k, v in profile.items():
            pr = v["profile"]
            print(f"{k:16s} {1000 * pr['step_s']:8.0f}" + "".join(
                f"{1000 * pr['step_s'] * pr['share'].get(p, 0):11.0f}" for p in phases))
        if args.profile_only:
            print(f"wrote {merge_profile(profile)} (its throughput claims are the last full run's)")
            return 0

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
                                   "ratios": {"full": ba, "lora": dc, "two_vs_one_worker": ed},
                                   **({"profile": profile} if profile else {})}, claims)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
