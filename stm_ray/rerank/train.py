"""``train_rerankers(cfg)``: one Ray Train run per reranker of ``rerank.rerankers``, concurrently, from the shards.

Layout under ``<run_dir>``::

    train/reranker-<name>-<fingerprint>/   Ray Train storage: checkpoints (a rerun with the same fingerprint resumes)
    rerankers/<name>/                      the reranker: a Hugging Face folder (LoRA merged) + stm_ray_reranker.json
    rerankers/<name>/metrics.json          loss curve, throughput, the fingerprint (reranker done)
    rerankers/summary.json                 one row per reranker

A training example is a group: one shard row's query, its positive (index 0) and ``rerank.negatives_per_query``
negatives sampled from the row's hard negatives (mined and LLM-written); slots the row cannot fill take other
queries' positives of the same global batch. Every worker computes the same plan from (rows, seed, epoch) and takes
its slice of each global batch, so the number of workers does not change what is learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_ray.data.shards import read_shards
from stm_ray.data.task import DataError, DataReport
from stm_ray.stage import Decision, Fingerprint, decide, fingerprint
from stm_ray.storage import run_path
from stm_ray.utils import atomic_dir, atomic_write_json, init_local_ray

log = logging.getLogger("stm_ray.rerank")


@dataclass
class RerankRows:
    """The training rows (plain lists: cheap through the object store)."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]

    def __len__(self) -> int:
        return len(self.queries)

    @classmethod
    def from_table(cls, table, max_rows: int | None = None, seed: int = 13) -> RerankRows:
        idx = np.arange(table.num_rows)
        if max_rows is not None and max_rows < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(len(idx), size=max_rows, replace=False))
            table = table.take(idx)
        return cls(queries=table.column("query").to_pylist(), positives=table.column("positive").to_pylist(),
                   negatives=[list(n or []) for n in table.column("negatives").to_pylist()])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for col in (self.queries, self.positives):
            h.update("\x1f".join(col).encode())
        h.update(json.dumps(self.negatives).encode())
        return h.hexdigest()[:16]


def plan(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each global batch of one epoch; the last short batch is completed with the epoch's first rows."""
    if n_rows == 0:
        return []
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    if n_rows < batch_size:
        return [perm]
    out = []
    for s in range(0, n_rows, batch_size):
        chunk = perm[s:s + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, perm[:batch_size - len(chunk)]])
        out.append(chunk)
    return out


def build_groups(rows: RerankRows, batch: np.ndarray, part: np.ndarray, n_neg: int, seed: int,
                 step: int) -> tuple[list[str], list[str]]:
    """(queries, documents) of the rows ``part`` of global batch ``batch``, ``1 + n_neg`` pairs per row in order:
    the positive, then negatives (the row's own first, then other rows' positives of the batch)."""
    qs, ds = [], []
    for i in part:
        i = int(i)
        rng = np.random.default_rng([seed, step, i])
        own = rows.negatives[i]
        negs = [own[j] for j in rng.permutation(len(own))[:n_neg]]
        if len(negs) < n_neg:
            others = [rows.positives[int(j)] for j in batch if int(j) != i and rows.positives[int(j)] != rows.positives[i]]
            negs += [others[j] for j in rng.permutation(len(others))[:n_neg - len(negs)]]
        while len(negs) < n_neg:  # a batch of one query with no negatives at all
            negs.append("")
        qs += [rows.queries[i]] * (1 + n_neg)
        ds += [rows.positives[i], *negs]
    return qs, ds


def group_loss(logits, n_neg: int, kind: str):
    """``softmax``: cross-entropy over each query's group (the positive first); ``bce``: pointwise binary CE."""
    import torch
    import torch.nn.functional as F

    g = logits.float().view(-1, 1 + n_neg)
    if kind == "softmax":
        return F.cross_entropy(g, torch.zeros(len(g), dtype=torch.long, device=g.device))
    labels = torch.zeros_like(g)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(g, labels)


def build_reranker(spec: dict[str, Any], instruction: str, device: str = "cpu"):
    from stm_ray.rerank.model import CrossEncoderReranker, LLMReranker

    if spec["kind"] == "llm":
        return LLMReranker.from_pretrained(spec["model"], max_length=spec["max_length"], device=device,
                                           instruction=instruction)
    return CrossEncoderReranker.from_pretrained(spec["model"], max_length=spec["max_length"], device=device)


# ---------------------------------------------------------------------------------------------- the worker

def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of a reranker's TorchTrainer (DDP or DeepSpeed, checkpoints, resume)."""
    import os

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from stm_ray.config import RerankConfig
    from stm_ray.train.worker import (
        DS_TAG,
        MODEL_DIR,
        STATE_FILE,
        TRAINER_FILE,
        _mean_across_workers,
        _progress_actor,
        _world,
        clear_stale_extension_locks,
        deepspeed_config,
        lr_lambda,
        peak_memory_gib,
        restore_checkpoint,
    )
    from stm_ray.utils import setup_logging

    setup_logging()
    rcfg = RerankConfig.model_validate(config["rerank"])
    spec = config["spec"]
    name = spec["name"]
    rank, world = _world()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or rcfg.cpus_per_worker))
    rows = config["rows"]
    if isinstance(rows, ray.ObjectRef):
        rows = ray.get(rows)
    total = config["total_steps"]
    use_ds = rcfg.strategy == "deepspeed"
    device = ray.train.torch.get_device() if rcfg.use_gpu else torch.device("cpu")

    torch.manual_seed(rcfg.seed)  # the cross-encoder's new head and LoRA start the same on every worker and rerun
    net = build_reranker(spec, rcfg.instruction, str(device))
    if spec.get("lora") is not None:
        lo = spec["lora"]
        net.add_lora(r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"], target_modules=lo["target_modules"])
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=spec["learning_rate"], weight_decay=rcfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(round(rcfg.warmup_ratio * total))))
    local = rcfg.batch_size // world
    engine = None
    if use_ds:
        import deepspeed

        clear_stale_extension_locks()
        engine, opt, _, sched = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched,
                                                     config=deepspeed_config(rcfg, local))
        model = engine
    else:
        model = ray.train.torch.prepare_model(net, move_to_device=False) if world > 1 else net
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if rcfg.use_gpu and not use_ds else nullcontext()

    state: dict[str, Any] = {"reranker": name, "step": 0, "total_steps": total, "loss": [], "lr": [],
                             "resumed_from": [], "world_size": world, "step_seconds": []}
    resumed = restore_checkpoint(state, engine, net, opt, sched, device)
    if resumed is not None and rank == 0:
        log.info("[reranker %s] resumed from the checkpoint at step %d of %d", name, resumed, total)
    progress = _progress_actor(config.get("progress_actor")) if rank == 0 else None

    def save_checkpoint(final: bool) -> None:
        state["peak_memory_gib"] = max(state.get("peak_memory_gib") or 0.0, peak_memory_gib(device))
        with tempfile.TemporaryDirectory(prefix="stm-rr-ckpt-") as tmp:
            d = Path(tmp)
            if engine is not None:
                engine.save_checkpoint(str(d), tag=DS_TAG, exclude_frozen_parameters=spec.get("lora") is not None)
            elif rank == 0:
                torch.save({"trainable": {n: p.detach().cpu() for n, p in net.named_parameters() if p.requires_grad},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, d / TRAINER_FILE)
            if final:
                ctx = nullcontext()
                if engine is not None and rcfg.zero_stage == 3:
                    import deepspeed

                    ctx = deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None)
                with ctx:
                    if rank == 0:
                        net.eval()
                        net.save(d / MODEL_DIR, extra_metadata={"reranker": name, "train_steps": state["step"],
                                                                "fingerprint": config["fingerprint"]})
            if rank == 0:
                (d / STATE_FILE).write_text(json.dumps(state))
            keep = engine is not None or rank == 0
            ray.train.report({"step": state["step"], "loss": state["loss"][-1] if state["loss"] else math.nan},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if keep else None)

    n_neg = rcfg.negatives_per_query
    per_epoch = len(plan(len(rows), rcfg.batch_size, rcfg.seed, 0))
    step = state["step"]
    t_last = time.perf_counter()
    for epoch in range(rcfg.epochs):
        for b, batch in enumerate(plan(len(rows), rcfg.batch_size, rcfg.seed, epoch)):
            gstep = epoch * per_epoch + b
            if gstep < step:
                continue
            if gstep >= total:
                break
            per = len(batch) // world
            qs, ds = build_groups(rows, batch, batch[rank * per:(rank + 1) * per], n_neg, rcfg.seed, gstep)
            if engine is None:
                opt.zero_grad(set_to_none=True)
            # micro-batches of whole groups, gradients accumulated: the same update in the memory of one of them
            mb = min(rcfg.micro_batch or per, per)
            starts = list(range(0, per, mb))
            loss = torch.zeros((), device=device)
            for j, s0 in enumerate(starts):
                last = j == len(starts) - 1
                lo, hi = s0 * (1 + n_neg), min(s0 + mb, per) * (1 + n_neg)
                feats = {k: v.to(device) for k, v in net.tokenize(qs[lo:hi], ds[lo:hi]).items()}
                sync = (model.no_sync() if engine is None and not last and hasattr(model, "no_sync")
                        else nullcontext())
                with sync:
                    with autocast:
                        logits = model(feats)
                    part = group_loss(logits, n_neg, rcfg.loss) * ((hi - lo) / len(qs))
                    if engine is not None:
                        engine.set_gradient_accumulation_boundary(last)
                        engine.backward(part, scale_wrt_gas=False)
                    else:
                        part.backward()
                loss = loss + part.detach()
            if engine is not None:
                engine.step()
            else:
                if rcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, rcfg.max_grad_norm)
                opt.step()
                sched.step()
            value = _mean_across_workers(float(loss.detach()))
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            step = gstep + 1
            state["step"] = step
            state["loss"].append(value)
            state["lr"].append(float(sched.get_last_lr()[0]))
            state["step_seconds"].append(dt)
            if rank == 0:
                sps = rcfg.batch_size / dt if dt > 0 else 0.0
                if progress is not None:
                    progress.update.remote(f"reranker {name}", step=step, total=total, loss=value, samples_per_s=sps)
                if step % rcfg.log_every == 0 or step == total:
                    log.info("[reranker %s] step %d/%d loss %.4f lr %.2e %.1f queries/s", name, step, total, value,
                             state["lr"][-1], sps)
            if step % rcfg.checkpoint_every == 0 and step < total:
                save_checkpoint(final=False)
                t_last = time.perf_counter()
    save_checkpoint(final=True)


# ---------------------------------------------------------------------------------------------- the driver

@dataclass
class RerankerResult:
    name: str
    kind: str
    path: str
    rows: int = 0
    steps: int = 0
    final_loss: float | None = None
    queries_per_s: float | None = None
    wall_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    skipped: bool = False
    trained: bool = True
    fingerprint: str = ""
    peak_memory_gib: float | None = None


def reranker_fingerprint(cfg, spec, rows: RerankRows) -> Fingerprint:
    """What decides a reranker's weights: the rerank training fields, its spec, its rows and its base model."""
    from stm_ray.modeling import model_fingerprint

    return fingerprint("rerankers", cfg, {"spec": spec.model_dump(mode="json"), "rows": rows.fingerprint(),
                                          "base": model_fingerprint(spec.model)})


def _storage(cfg, name: str, fp: Fingerprint) -> tuple[str, str]:
    from stm_ray.storage import native_uri

    return native_uri(cfg.run_dir, "train"), f"reranker-{name}-{fp.value}"


def total_steps(n_rows: int, rcfg, spec=None) -> int:
    per_epoch = len(plan(n_rows, rcfg.batch_size, rcfg.seed, 0))
    total = per_epoch * rcfg.epochs
    cap = (spec.max_steps if spec is not None else None) or rcfg.max_steps
    return min(total, cap) if cap else total


def decide_reranker(cfg, spec, rows: RerankRows) -> tuple[Fingerprint, Decision, dict | None]:
    """(fingerprint, decision, the finished reranker's metrics.json when there is one) by the stage contract."""
    out = run_path(cfg.run_dir).resolve() / "rerankers" / spec.name
    fp = reranker_fingerprint(cfg, spec, rows)
    try:
        prev = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        prev = None
    if prev is not None:
        return fp, decide(fp, spec.name, prev, complete=True, where=str(out)), prev
    from stm_ray.train.experts import has_train_run

    storage_path, run_name = _storage(cfg, spec.name, fp)
    return fp, decide(fp, spec.name, {"fingerprint": fp.value} if has_train_run(cfg, run_name) else None,
                      complete=False, where=f"{storage_path}/{run_name}"), None


def train_reranker(cfg, spec, rows: RerankRows, *, progress_actor: str | None = None,
                   decided: tuple[Fingerprint, Decision, dict | None] | None = None) -> RerankerResult:
    """Train one reranker (a TorchTrainer) into ``<run_dir>/rerankers/<name>``, by the stage contract: reuse a
    finished one with the same fingerprint, resume an unfinished one, redo one whose fingerprint changed
    (``decided``: what :func:`decide_reranker` already said)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stm_ray.train.experts import _plot_loss
    from stm_ray.train.worker import MODEL_DIR, STATE_FILE

    rcfg = cfg.rerank
    run_dir = run_path(cfg.run_dir).resolve()
    out = run_dir / "rerankers" / spec.name
    fp, decision, prev = decided or decide_reranker(cfg, spec, rows)
    storage_path, run_name = _storage(cfg, spec.name, fp)
    if decision.action == "reuse":
        return RerankerResult(**{**prev["result"], "skipped": True})
    if decision.action == "redo":
        from stm_ray.train.experts import clear_old_runs

        clear_old_runs(cfg, f"reranker-{spec.name}", None if decision.previous == fp.value else run_name)
    total = total_steps(len(rows), rcfg, spec)
    if total == 0:
        raise DataError(f"reranker {spec.name}: no training rows")
    log.info("[reranker %s] %s from %s: %d rows, %d steps, %d worker(s), %s loss, run %s", spec.name, spec.kind,
             spec.model, len(rows), total, rcfg.num_workers, rcfg.loss, run_name)
    t0 = time.perf_counter()
    from stm_ray.train.rendezvous import torch_config

    trainer = TorchTrainer(
        train_loop,
        torch_config=torch_config(),  # the rendezvous listens on the node's address only
        train_loop_config={"rerank": rcfg.model_dump(), "spec": spec.model_dump(), "rows": ray.put(rows),
                           "total_steps": total, "progress_actor": progress_actor, "fingerprint": fp.value},
        scaling_config=ScalingConfig(num_workers=rcfg.num_workers, use_gpu=rcfg.use_gpu,
                                     resources_per_worker={"CPU": rcfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=rcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=rcfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(rcfg.cpus_per_worker)}}))
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        if state["step"] != total or not (Path(d) / MODEL_DIR).is_dir():
            raise RuntimeError(f"reranker {spec.name}: the last checkpoint is at step {state['step']} of {total}")
        with atomic_dir(out) as tmp:
            shutil.copytree(Path(d) / MODEL_DIR, tmp, dirs_exist_ok=True)
    secs = state["step_seconds"][1:] or state["step_seconds"]
    qps = rcfg.batch_size * len(secs) / sum(secs) if secs and sum(secs) > 0 else None
    res = RerankerResult(name=spec.name, kind=spec.kind, path=str(out), rows=len(rows), steps=state["step"],
                         final_loss=float(np.mean(state["loss"][-max(1, min(10, len(state["loss"]))):])),
                         queries_per_s=qps, wall_s=wall, resumed_from=state["resumed_from"], fingerprint=fp.value,
                         peak_memory_gib=state.get("peak_memory_gib"))
    try:
        _plot_loss(state["loss"], out / "loss.png", f"reranker {spec.name} ({rcfg.loss})")
    except Exception as e:  # noqa: BLE001 - a plot must not fail training
        log.warning("loss plot of reranker %s not written: %s", spec.name, e)
    atomic_write_json(out / "metrics.json", {"result": asdict(res), "loss": state["loss"], "lr": state["lr"],
                                             "step_seconds": state["step_seconds"], **fp.record()})
    log.info("[reranker %s] done: %d steps, loss %.4f, %.1f queries/s -> %s", spec.name, res.steps,
             res.final_loss, qps or 0.0, out)
    return res


def train_rerankers(cfg, *, shards: str | None = None, only: list[str] | None = None,
                    show_progress: bool = True) -> list[RerankerResult]:
    """Train every reranker of ``rerank.rerankers`` with ``train: true`` on the shards (``train.shards`` or
    ``<run_dir>/synth``), concurrently as far as the cluster allows; ``train: false`` ones are listed as they are.
    Writes ``<run_dir>/rerankers/summary.json``."""
    import ray

    from stm_ray.train.experts import TrainProgress, _progress_loop

    rcfg = cfg.rerank
    specs = [s for s in rcfg.rerankers if not only or s.name in only]
    if only and len(specs) != len(only):
        raise DataError(f"unknown reranker(s) {sorted(set(only) - {s.name for s in specs})}; "
                        f"rerankers: {[s.name for s in rcfg.rerankers]}")
    if not specs:
        raise DataError("no rerankers configured: set rerank.rerankers, e.g. rerank.rerankers=[cross-encoder,llm]")
    results: dict[str, RerankerResult] = {}
    todo = [s for s in specs if s.train]
    for s in specs:
        if not s.train:
            results[s.name] = RerankerResult(name=s.name, kind=s.kind, path=s.model, trained=False)
    if todo:
        source = shards or cfg.train.shards or str(run_path(cfg.run_dir) / "synth")
        report = DataReport()
        table = read_shards(source, strict=cfg.data.strict, report=report)
        rows = RerankRows.from_table(table, rcfg.max_rows, rcfg.seed)
        if len(rows) == 0:
            raise DataError(f"{source}: no training rows for the rerankers")
        log.info("%d reranker(s) from %s: %d rows%s", len(todo), source, len(rows),
                 f" ({len(report.problems)} bad rows skipped)" if report.problems else "")
        decided = {s.name: decide_reranker(cfg, s, rows) for s in todo}  # here: the stage's recorder sees them
        for s in [s for s in todo if decided[s.name][1].action == "reuse"]:
            results[s.name] = RerankerResult(**{**decided[s.name][2]["result"], "skipped": True})
        todo = [s for s in todo if s.name not in results]
    if todo:
        init_local_ray()
        actor_name = f"stm-rerank-progress-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(TrainProgress).options(name=actor_name, num_cpus=0).remote()
        done = threading.Event()
        watcher = threading.Thread(target=_progress_loop, daemon=True,
                                   args=(actor, [f"reranker {s.name}" for s in todo], done, show_progress))
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=len(todo)) as ex:
                futures = {s.name: ex.submit(train_reranker, cfg, s, rows, progress_actor=actor_name,
                                             decided=decided[s.name]) for s in todo}
                results.update({n: f.result() for n, f in futures.items()})
        finally:
            done.set()
            watcher.join(timeout=15)
            ray.kill(actor)
    ordered = [results[s.name] for s in specs]
    path = run_path(cfg.run_dir) / "rerankers" / "summary.json"
    try:
        previous = json.loads(path.read_text()).get("rerankers", [])
    except (OSError, ValueError):
        previous = []
    kept = [r for r in previous if only and r.get("name") not in results]
    atomic_write_json(path, {"rerankers": kept + [asdict(r) for r in ordered]})
    return ordered


def current_rerankers(cfg) -> dict[str, str]:
    """{name: folder} of the configured rerankers whose trained folder matches the summary (or the given folder
    for ``train: false``); a configured reranker not trained yet is left out with a warning."""
    root = run_path(cfg.run_dir) / "rerankers"
    try:
        listed = {r["name"]: r for r in json.loads((root / "summary.json").read_text()).get("rerankers", [])}
    except (OSError, ValueError):
        listed = {}
    out = {}
    for s in cfg.rerank.rerankers:
        if not s.train:
            out[s.name] = s.model
        elif (root / s.name / "metrics.json").is_file() and s.name in listed:
            out[s.name] = str((root / s.name).resolve())
        else:
            log.warning("reranker %s is not trained yet (run the rerankers stage): left out", s.name)
    return out


def summary_table(results: list[RerankerResult]) -> str:
    from stm_ray.tables import format_table

    rows = [{"reranker": r.name, "kind": r.kind, "steps": r.steps if r.trained else "-",
             "loss": f"{r.final_loss:.4f}" if r.final_loss is not None else "-",
             "queries/s": f"{r.queries_per_s:.1f}" if r.queries_per_s else "-",
             "status": "given" if not r.trained else ("reused" if r.skipped else "trained"), "path": r.path}
            for r in results]
    return format_table(rows, ["reranker", "kind", "steps", "loss", "queries/s", "status", "path"])
