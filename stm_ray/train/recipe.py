"""One Ray Train recipe for every trainer (the experts, the rerankers): the per-worker loop and the driver.

A :class:`Recipe` names the steps in which trainers differ; each worker runs them inside one loop,
:func:`train_loop`::

    model       the net to train, built on the worker's device (seeded: every worker and rerun starts the same)
    data        the global batches of an epoch (every worker computes the same plan and takes its slice)
    optimizer   AdamW and its LR schedule (the loop wraps them, with the net, in DeepSpeed or DDP)
    step        one global batch -> this worker's loss, forward and backward done
    checkpoint  the training state written next to the weights (``STATE_FILE``) and restored on resume
    save        the final model folder (``MODEL_DIR`` of the last checkpoint)
    metrics     what each checkpoint reports to Ray Train

The loop does the rest: world and rank, DeepSpeed or DDP, resume from the run's last checkpoint, gradient
clipping, the LR schedule, a checkpoint every ``checkpoint_every`` steps and at the end, progress, peak memory.

The driver: :func:`fit` runs one :class:`TrainJob` (a TorchTrainer whose rendezvous listens on the node's address
only, its storage under ``<run_dir>/train/<run name>``, resumed from there after a failure or a restart) and
publishes its model folder; :func:`run_trainers` runs N of them side by side under one progress display.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stm_ray.records import read_record
from stm_ray.stage import Decision, Fingerprint, decide
from stm_ray.utils import atomic_dir, atomic_write_json

log = logging.getLogger("stm_ray.train")

STATE_FILE = "train_state.json"
TRAINER_FILE = "trainer.pt"
DS_TAG = "deepspeed"
MODEL_DIR = "model"


# ---------------------------------------------------------------------------------------------- the worker

def lr_lambda(total: int, warmup: int):
    """Linear warm-up, then linear decay to 0 (as transformers' get_linear_schedule_with_warmup)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, total: int, warmup: int):
    """(AdamW, its linear warm-up/decay schedule): the optimizer of every recipe."""
    # the fused AdamW kernel (CPU and GPU) is several times faster than the per-tensor loop on CPU
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))


def deepspeed_config(tcfg, local_batch: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(tcfg.use_gpu)},
        "steps_per_print": 10**9,
    }
    if tcfg.max_grad_norm:
        cfg["gradient_clipping"] = tcfg.max_grad_norm
    for k, v in (tcfg.deepspeed or {}).items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def clear_stale_extension_locks(max_age_s: float = 600.0) -> list[Path]:
    """Remove torch C++-extension build locks older than ``max_age_s``.

    DeepSpeed compiles ops (on CPU: its shared-memory communication) on first use under a file lock in
    ``$TORCH_EXTENSIONS_DIR`` (~/.cache/torch_extensions). A process killed mid-build leaves the lock behind, and
    every later DeepSpeed start then waits for it forever. A build takes well under a minute, so an old lock is stale.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    now = time.time()
    for lock in root.glob("*/*/lock") if root.is_dir() else []:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale torch extension build lock %s (left by a killed build)", lock)
        except OSError:
            pass
    return removed


def _mean_across_workers(x: float) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / dist.get_world_size())
    return x


def peak_memory_gib(device: torch.device) -> float:
    """This worker's peak memory so far: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Recipe:
    """A trainer's steps (see the module's docstring), built on each worker from the TorchTrainer's config:
    ``name``, ``label``, ``total_steps``, ``rows``, ``settings`` and the recipe's own keys. ``cfg`` (the settings)
    holds what the loop reads: batch_size, epochs, seed, strategy, zero_stage, deepspeed, use_gpu, cpus_per_worker,
    max_grad_norm, checkpoint_every, log_every. The loop sets ``engine`` (DeepSpeed's, else None) and ``autocast``
    before the first step; ``lora`` (set by :meth:`model`) leaves frozen weights out of DeepSpeed checkpoints."""

    kind: ClassVar[str] = "model"  # the training state's key holding the name ("expert", "reranker")
    settings: ClassVar[type]  # the model of ``cfg`` (TrainConfig, RerankConfig)
    unit: ClassVar[str] = "samples"  # what the batch size counts, in the log's throughput
    log: ClassVar[logging.Logger] = log

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        import ray
        import ray.train.torch

        self.config, self.rank, self.world = config, rank, world
        self.cfg = self.settings.model_validate(config["settings"])
        self.name, self.label, self.total, rows = config["name"], config["label"], config["total_steps"], config["rows"]
        self.rows = ray.get(rows) if isinstance(rows, ray.ObjectRef) else rows
        self.device = ray.train.torch.get_device() if self.cfg.use_gpu else torch.device("cpu")
        self.lora, self.engine, self.autocast = False, None, nullcontext()

    def model(self) -> nn.Module: ...
    def data(self, epoch: int) -> list: ...
    def optimizer(self, params: list[nn.Parameter]) -> tuple[Any, Any]: ...
    def step(self, model: nn.Module, batch: Any, step: int) -> torch.Tensor: ...
    def save(self, folder: Path, state: dict[str, Any]) -> None: ...

    def checkpoint(self) -> dict[str, Any]:
        return {self.kind: self.name, "step": 0, "total_steps": self.total, "loss": [], "lr": [],
                "resumed_from": [], "world_size": self.world, "step_seconds": []}

    def metrics(self, state: dict[str, Any], final: bool) -> dict[str, Any]:
        return {"step": state["step"], "loss": state["loss"][-1] if state["loss"] else math.nan, "final": final}

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss) if self.engine is not None else loss.backward()


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of every TorchTrainer here: runs ``config["recipe"]`` (a :class:`Recipe`)."""
    import ray
    import ray.train
    import ray.train.torch

    from stm_ray.utils import setup_logging

    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    r: Recipe = config["recipe"](config, rank, world)
    cfg, total, device = r.cfg, r.total, r.device
    torch.set_num_threads(cfg.cpus_per_worker)

    net = r.model()
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt, sched = r.optimizer(trainable)
    engine = None
    if cfg.strategy == "deepspeed":
        import deepspeed

        clear_stale_extension_locks()
        engine, opt, _, sched = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched,
                                                     config=deepspeed_config(cfg, cfg.batch_size // world))
        model: nn.Module = engine
    else:
        model = ray.train.torch.prepare_model(net) if world > 1 else net
    # fp32 weights; bf16 comes from autocast (DDP) or DeepSpeed's bf16 on GPU
    r.engine = engine
    r.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.use_gpu and engine is None else nullcontext()

    state = r.checkpoint()
    ckpt = ray.train.get_checkpoint()  # the run's last one: resume from it (after a failure, or in a rerun)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            prev = json.loads((Path(d) / STATE_FILE).read_text())
            if engine is not None:
                engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            else:
                blob = torch.load(Path(d) / TRAINER_FILE, map_location=device, weights_only=False)
                net.load_state_dict(blob["trainable"], strict=False)
                opt.load_state_dict(blob["optimizer"])
                sched.load_state_dict(blob["scheduler"])
        state.update({k: prev[k] for k in ("step", "loss", "lr", "resumed_from", "step_seconds")})
        state["resumed_from"].append(prev["step"])
        if rank == 0:
            r.log.info("[%s] resumed from the checkpoint at step %d of %d", r.label, prev["step"], total)
    progress = None
    if rank == 0 and config.get("progress_actor"):
        try:
            progress = ray.get_actor(config["progress_actor"])
        except ValueError:
            pass

    def save_checkpoint(final: bool) -> None:
        state["peak_memory_gib"] = max(state.get("peak_memory_gib") or 0.0, peak_memory_gib(device))
        with tempfile.TemporaryDirectory(prefix="stm-ckpt-") as tmp:
            d = Path(tmp)
            if engine is not None:
                engine.save_checkpoint(str(d), tag=DS_TAG, exclude_frozen_parameters=r.lora)
            elif rank == 0:
                torch.save({"trainable": {n: p.detach().cpu() for n, p in net.named_parameters() if p.requires_grad},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, d / TRAINER_FILE)
            if final:
                gather = nullcontext()
                if engine is not None and cfg.zero_stage == 3:
                    import deepspeed

                    gather = deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None)
                with gather:
                    if rank == 0:
                        r.save(d / MODEL_DIR, state)
            if rank == 0:
                (d / STATE_FILE).write_text(json.dumps(state))
            keep = engine is not None or rank == 0
            ray.train.report(r.metrics(state, final),
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if keep else None)

    per_epoch = len(r.data(0))
    step = state["step"]
    t_last = time.perf_counter()
    for epoch in range(cfg.epochs):
        if step >= total:
            break
        for b, batch in enumerate(r.data(epoch)):
            gstep = epoch * per_epoch + b
            if gstep < step:
                continue
            if gstep >= total:
                break
            if engine is None:
                opt.zero_grad(set_to_none=True)
            loss = r.step(model, batch, gstep)
            if engine is not None:
                engine.step()
            else:
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                opt.step()
                sched.step()
            loss_value = _mean_across_workers(float(loss.detach()))
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            step = gstep + 1
            state["step"] = step
            state["loss"].append(loss_value)
            state["lr"].append(float(sched.get_last_lr()[0]))
            state["step_seconds"].append(dt)
            if rank == 0:
                sps = cfg.batch_size / dt if dt > 0 else 0.0
                if progress is not None:
                    progress.update.remote(r.label, step=step, total=total, loss=loss_value, samples_per_s=sps)
                if step % cfg.log_every == 0 or step == total:
                    r.log.info("[%s] step %d/%d loss %.4f lr %.2e %.1f %s/s", r.label, step, total, loss_value,
                               state["lr"][-1], sps, r.unit)
            if step % cfg.checkpoint_every == 0 and step < total:
                save_checkpoint(final=False)
                t_last = time.perf_counter()
    save_checkpoint(final=True)


# ---------------------------------------------------------------------------------------------- the driver

def storage(cfg, prefix: str, fp: Fingerprint) -> tuple[str, str]:
    """(Ray Train's storage_path, the run's name ``<prefix>-<fingerprint>``): the run directory's ``train/``, on the
    object store itself for a remote run (every worker writes its checkpoints there; nothing assumes a shared disk)."""
    from stm_ray.storage import native_uri

    return native_uri(cfg.run_dir, "train"), f"{prefix}-{fp.value}"


def has_train_run(cfg, run_name: str) -> bool:
    """Whether ``train/<run_name>`` (an interrupted Ray Train run) exists, on the store for a remote run."""
    from stm_ray.storage import RunStore

    return run_name in RunStore(cfg.run_dir).list_dirs("train")


def clear_old_runs(cfg, prefix: str, keep: str | None) -> None:
    """Delete Ray Train runs ``train/<prefix>-<fingerprint>`` other than ``keep``: checkpoints of another
    fingerprint are of no use (on the store too, so none is ever restored by mistake)."""
    from stm_ray.storage import RunStore

    store = RunStore(cfg.run_dir)
    for old in store.list_dirs("train"):
        if re.fullmatch(rf"{re.escape(prefix)}-[0-9a-f]{{10,16}}", old) and old != keep:
            store.delete(f"train/{old}")


def decide_run(cfg, fp: Fingerprint, name: str, out: Path, prefix: str) -> tuple[Decision, dict | None]:
    """The stage contract for a trained model: (decision, the finished model's metrics.json when there is one).
    Finished: ``out/metrics.json``; unfinished: the Ray Train run ``train/<prefix>-<fingerprint>`` exists."""
    prev = read_record(out / "metrics.json", kind="training metrics")
    if prev is not None:
        return decide(fp, name, prev, complete=True, where=str(out)), prev
    storage_path, run_name = storage(cfg, prefix, fp)
    partial = {"fingerprint": fp.value} if has_train_run(cfg, run_name) else None
    return decide(fp, name, partial, complete=False, where=f"{storage_path}/{run_name}"), None


def plot_loss(loss: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stm_ray.utils import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(loss) + 1), loss, lw=1, alpha=0.5, label="loss")
    if len(loss) >= 10:
        w = max(2, len(loss) // 20)
        ax.plot(range(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"), lw=2, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def stamp(folder: Path, fp: Fingerprint) -> None:
    """Record the producing fingerprint in the model folder's stm_ray.json (what model_fingerprint reads)."""
    from stm_ray.modeling.embedder import META_FILE

    path = folder / META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta["fingerprint"] = fp.value
    path.write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Trained:
    """A finished run, for its job's ``result``: the result fields every trainer records, the throughput (batch
    items per second after the first step, None without timings), when it started and finished."""

    fields: dict[str, Any]
    rate: float | None
    started_at: float
    finished_at: float


@dataclass
class TrainJob:
    """One Ray Train run: what its workers run on what, where it checkpoints, where its model goes."""

    cfg: Any  # the pipeline's config: its run_dir holds the run's checkpoints, train/<prefix>-<fingerprint>
    name: str
    label: str  # the progress bar's and the log's name
    prefix: str
    fp: Fingerprint
    decision: Decision  # run, resume or redo (checkpoints of other fingerprints are cleared first)
    recipe: type[Recipe]
    settings: Any  # the recipe's cfg (TrainConfig, RerankConfig); workers, GPUs, CPUs, failures, checkpoints kept
    config: dict[str, Any]  # the recipe's own keys of train_loop_config
    rows: Any  # the training rows (through the object store)
    total: int  # planned steps
    out: Path  # the model folder, published from the final checkpoint's MODEL_DIR, with metrics.json and loss.png
    title: str  # the loss plot's
    result: Callable[[Trained], Any]  # the result (a dataclass), recorded in metrics.json
    record: dict[str, Any] = field(default_factory=dict)  # more of metrics.json
    stamp: bool = False  # record the fingerprint in the model folder's stm_ray.json


def fit(job: TrainJob, progress_actor: str | None = None) -> Any:
    """Run ``job`` (one TorchTrainer, resumed from its checkpoints), publish its model folder with its loss curve
    and ``metrics.json``; returns its result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stm_ray.train.rendezvous import torch_config

    s, fp = job.settings, job.fp
    storage_path, run_name = storage(job.cfg, job.prefix, fp)
    if job.decision.action == "redo":  # other fingerprints' checkpoints are of no use, nor this one's under --force
        clear_old_runs(job.cfg, job.prefix, None if job.decision.previous == fp.value else run_name)
    t0, started = time.perf_counter(), time.time()
    trainer = TorchTrainer(
        train_loop,
        torch_config=torch_config(),  # the rendezvous listens on the node's address only
        train_loop_config={**job.config, "recipe": job.recipe, "settings": s.model_dump(), "name": job.name,
                           "label": job.label, "rows": ray.put(job.rows), "total_steps": job.total,
                           "progress_actor": progress_actor},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=s.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(s.cpus_per_worker)}}),
    )
    result = trainer.fit()
    wall, finished = time.perf_counter() - t0, time.time()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        if state["step"] != job.total or not (Path(d) / MODEL_DIR).is_dir():
            raise RuntimeError(f"{job.recipe.kind} {job.name}: the last checkpoint is at step {state['step']} of "
                               f"{job.total} without a model")
        with atomic_dir(job.out) as tmp:
            shutil.copytree(Path(d) / MODEL_DIR, tmp, dirs_exist_ok=True)
            if job.stamp:
                stamp(tmp, fp)
    loss, secs = state["loss"], state["step_seconds"][1:] or state["step_seconds"]
    fields = {"name": job.name, "path": str(job.out), "rows": len(job.rows), "steps": state["step"],
              "final_loss": float(np.mean(loss[-max(1, min(10, len(loss))):])), "wall_s": wall,
              "resumed_from": state["resumed_from"], "fingerprint": fp.value,
              "peak_memory_gib": state.get("peak_memory_gib")}
    rate = s.batch_size * len(secs) / sum(secs) if secs and sum(secs) > 0 else None
    res = job.result(Trained(fields, rate, started, finished))
    try:
        plot_loss(loss, job.out / "loss.png", job.title)
    except Exception as e:  # noqa: BLE001 - a plot must not fail training
        log.warning("loss plot of %s not written: %s", job.label, e)
    atomic_write_json(job.out / "metrics.json", {"result": asdict(res), "loss": loss, "lr": state["lr"],
                                                 "step_seconds": state["step_seconds"], **job.record, **fp.record()})
    job.recipe.log.info("[%s] done: %d steps, loss %.4f -> %s", job.label, res.steps, res.final_loss, job.out)
    return res


class TrainProgress:
    """Latest step, loss and throughput per run, pushed by each run's rank-0 worker (a Ray actor)."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, label: str, **kw: Any) -> None:
        self.state[label] = kw

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.state


def progress_loop(actor, names: list[str], done: threading.Event, show: bool) -> None:
    """One tqdm bar per run, from the :class:`TrainProgress` actor, until ``done``."""
    import ray
    from tqdm.auto import tqdm

    if not show:
        done.wait()
        return
    bars: dict[str, Any] = {}
    while True:
        finished = done.wait(1.0)
        try:
            snap = ray.get(actor.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress display must never fail the run
            snap = {}
        for name in names:
            s = snap.get(name)
            if not s:
                continue
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=s["total"], desc=f"train {name}", position=len(bars), unit="step",
                                        dynamic_ncols=True, mininterval=1.0)
            if bar.n >= bar.total:
                continue
            bar.n = s["step"]
            bar.set_postfix(loss=f"{s['loss']:.4f}", sps=f"{s['samples_per_s']:.1f}", refresh=False)
            bar.refresh()
        if finished:
            for bar in bars.values():
                bar.close()
            return


def run_trainers(jobs: list[TrainJob], *, show_progress: bool = True, max_parallel: int | None = None,
                 on_finished: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the jobs side by side (at most ``max_parallel`` at once; Ray queues what does not fit the cluster)
    under one progress display; returns {job name: what its ``finish`` returned}. ``on_finished(result)`` is
    called for a job that finishes while others still train and none waits for a slot."""
    import ray

    from stm_ray.ray_setup import init_local_ray

    if not jobs:
        return {}
    init_local_ray()
    actor_name = f"stm-train-progress-{uuid.uuid4().hex[:8]}"
    actor = ray.remote(TrainProgress).options(name=actor_name, num_cpus=0).remote()
    done = threading.Event()
    watcher = threading.Thread(target=progress_loop, args=(actor, [j.label for j in jobs], done, show_progress),
                               daemon=True)
    watcher.start()
    results: dict[str, Any] = {}
    try:
        slots = max_parallel or len(jobs)
        with ThreadPoolExecutor(max_workers=slots) as ex:
            futures = {ex.submit(fit, j, actor_name): j.name for j in jobs}
            for f in as_completed(futures):
                results[futures[f]] = result = f.result()
                unfinished = sum(not g.done() for g in futures)
                if on_finished is not None and 0 < unfinished < slots:  # others train, none waits
                    on_finished(result)
    finally:
        done.set()
        watcher.join(timeout=15)
        ray.kill(actor)
    return results
