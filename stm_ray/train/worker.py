"""The Ray Train worker loop: one expert, DDP or DeepSpeed, checkpoints, resume after a failure."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stm_ray.train.batching import build_batch, plan_batches, worker_slice
from stm_ray.train.grad_cache import deepspeed_backward, grad_cache_step
from stm_ray.train.loss import contrastive_step_loss

log = logging.getLogger("stm_ray.train")

STATE_FILE = "train_state.json"
TRAINER_FILE = "trainer.pt"
DS_TAG = "deepspeed"
MODEL_DIR = "model"


class TwoTower(nn.Module):
    """Queries and documents through one Embedder in a single module call, so DDP / DeepSpeed see one forward
    per backward (the shared weights are used twice inside it)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, q_features: dict[str, torch.Tensor], d_features: dict[str, torch.Tensor]):
        return self.embedder(q_features), self.embedder(d_features)


def lr_lambda(total: int, warmup: int):
    """Linear warm-up, then linear decay to 0 (as transformers' get_linear_schedule_with_warmup)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


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


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _mean_across_workers(x: float) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / dist.get_world_size())
    return x


def _progress_actor(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def peak_memory_gib(device: torch.device) -> float:
    """This worker's peak memory so far: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def restore_checkpoint(state: dict[str, Any], engine, net: nn.Module, opt, sched, device) -> int | None:
    """Load the Ray Train run's last checkpoint (DeepSpeed engine state, or trainable weights + optimizer +
    scheduler) into the model and ``state`` (step, curves, resumes); returns the step resumed from, None without
    a checkpoint. Shared by the expert and the reranker loops, which write checkpoints the same way."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
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
    return prev["step"]


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for :class:`ray.train.torch.TorchTrainer` (see :func:`stm_ray.train.experts.train_expert`)."""
    import ray
    import ray.train
    import ray.train.torch

    from stm_ray.config import ModelConfig, TrainConfig
    from stm_ray.modeling.embedder import Embedder
    from stm_ray.utils import setup_logging

    setup_logging()
    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    rank, world = _world()
    torch.set_num_threads(tcfg.cpus_per_worker)
    rows = config["rows"]
    if isinstance(rows, ray.ObjectRef):
        rows = ray.get(rows)
    total: int = config["total_steps"]
    expert: str = config["expert"]
    pool: list[str] = config.get("instruction_pool") or []
    use_ds = tcfg.strategy == "deepspeed"
    device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")

    # fp32 weights; bf16 comes from autocast (DDP) or DeepSpeed's bf16 on GPU
    emb = Embedder.from_config(mcfg.model_copy(update={"dtype": "float32", "device": str(device)}))
    if config.get("saved_query_instruction") is not None:
        emb.query_instruction = config["saved_query_instruction"]
    torch.manual_seed(tcfg.seed)
    if tcfg.lora is not None:
        emb.add_lora(r=tcfg.lora.r, alpha=tcfg.lora.alpha, dropout=tcfg.lora.dropout,
                     target_modules=tcfg.lora.target_modules)
    for pname, p in emb.named_parameters():
        if "pooler" in pname.split("."):  # an encoder's pooler head is not part of the embedding
            p.requires_grad_(False)
    if tcfg.gradient_checkpointing:
        emb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dims = tcfg.matryoshka_dims
    if dims and max(dims) > emb.dim:
        raise ValueError(f"train.matryoshka_dims {dims}: the model's embeddings have {emb.dim} dimensions")
    emb.matryoshka_dims = dims
    net = TwoTower(emb)
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    # the fused AdamW kernel (CPU and GPU) is several times faster than the per-tensor loop on CPU
    opt = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, fused=True)
    warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else int(round(tcfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))
    local_batch = tcfg.batch_size // world

    engine = None
    if use_ds:
        import deepspeed

        clear_stale_extension_locks()
        engine, opt, _, sched = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched,
                                                     config=deepspeed_config(tcfg, local_batch))
        model: nn.Module = engine
    else:
        model = ray.train.torch.prepare_model(net) if world > 1 else net
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tcfg.use_gpu and not use_ds else nullcontext())

    state: dict[str, Any] = {"expert": expert, "step": 0, "total_steps": total, "loss": [], "lr": [],
                             "resumed_from": [], "world_size": world, "step_seconds": []}
    resumed = restore_checkpoint(state, engine, net, opt, sched, device)
    if resumed is not None and rank == 0:
        log.info("[%s] resumed from the checkpoint at step %d of %d", expert, resumed, total)

    progress = _progress_actor(config.get("progress_actor")) if rank == 0 else None

    def save_checkpoint(final: bool) -> None:
        state["peak_memory_gib"] = max(state.get("peak_memory_gib") or 0.0, peak_memory_gib(device))
        metrics = {"step": state["step"], "loss": state["loss"][-1] if state["loss"] else math.nan,
                   "final": final}
        with tempfile.TemporaryDirectory(prefix="stm-ckpt-") as tmp:
            d = Path(tmp)
            if engine is not None:
                engine.save_checkpoint(str(d), tag=DS_TAG, exclude_frozen_parameters=tcfg.lora is not None)
            elif rank == 0:
                torch.save({"trainable": {n: p.detach().cpu() for n, p in net.named_parameters() if p.requires_grad},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, d / TRAINER_FILE)
            if final:
                gather = (engine is not None and tcfg.zero_stage == 3)
                ctx = nullcontext()
                if gather:
                    import deepspeed

                    ctx = deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None)
                with ctx:
                    if rank == 0:
                        emb.eval()
                        emb.save(d / MODEL_DIR, extra_metadata={"expert": expert, "train_steps": state["step"]})
            if rank == 0:
                (d / STATE_FILE).write_text(json.dumps(state))
            keep = engine is not None or rank == 0
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if keep else None)

    n_queries = tcfg.batch_size
    epoch_batches = len(plan_batches(rows.tasks, tcfg.batch_size, world, tcfg.seed, 0))
    step = state["step"]
    t_last = time.perf_counter()
    for epoch in range(tcfg.epochs):
        if step >= total:
            break
        plan = plan_batches(rows.tasks, tcfg.batch_size, world, tcfg.seed, epoch)
        for b, batch in enumerate(plan):
            gstep = epoch * epoch_batches + b
            if gstep < step:
                continue
            if gstep >= total:
                break
            wb = build_batch(rows, worker_slice(batch, rank, world), n_neg=tcfg.negatives_per_query,
                             instruction_mode=tcfg.instruction_mode, fixed_instruction=emb.query_instruction,
                             pool=pool, seed=tcfg.seed, step=gstep)
            valid = wb.doc_valid.to(device)

            def loss_fn(q: torch.Tensor, d_rows: torch.Tensor, wb=wb, valid=valid) -> torch.Tensor:
                d = d_rows.new_zeros((len(valid), d_rows.shape[-1])).index_put((valid.nonzero().squeeze(1),), d_rows)
                return contrastive_step_loss(q, d, n_neg=wb.n_neg, doc_valid=valid, doc_keys=wb.doc_keys.to(device),
                                             temperature=tcfg.temperature, gather=tcfg.gather_across_workers,
                                             dims=dims, teacher=wb.teacher, distill=tcfg.distill)

            if engine is None:
                opt.zero_grad(set_to_none=True)
            if tcfg.grad_cache:
                loss = grad_cache_step(model, emb.tokenize, wb.queries, wb.docs, wb.doc_valid, wb.n_neg,
                                       tcfg.grad_cache, loss_fn, device=device, autocast=autocast,
                                       backward=deepspeed_backward(engine) if engine is not None else None)
            else:
                qf = {k: v.to(device) for k, v in emb.tokenize(wb.queries).items()}
                df = {k: v.to(device) for k, v in emb.tokenize(wb.docs).items()}
                with autocast:
                    q, d_valid = model(qf, df)
                loss = loss_fn(q, d_valid)
                if engine is not None:
                    engine.backward(loss)
                else:
                    loss.backward()
            if engine is not None:
                engine.step()
            else:
                if tcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
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
                sps = n_queries / dt if dt > 0 else 0.0
                if progress is not None:
                    progress.update.remote(expert, step=step, total=total, loss=loss_value, samples_per_s=sps)
                if step % tcfg.log_every == 0 or step == total:
                    log.info("[%s] step %d/%d loss %.4f lr %.2e %.1f samples/s", expert, step, total, loss_value,
                             state["lr"][-1], sps)
            if step % tcfg.checkpoint_every == 0 and step < total:
                save_checkpoint(final=False)
                t_last = time.perf_counter()
    save_checkpoint(final=True)
