"""The experts' recipe for the Ray Train loop (:mod:`stm_ray.train.recipe`): an Embedder, queries and documents
through one module, InfoNCE (plus distillation) over the global batch, GradCache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stm_ray.config import ModelConfig, TrainConfig
from stm_ray.train.batching import build_batch, plan_batches, worker_slice
from stm_ray.train.grad_cache import deepspeed_backward, grad_cache_step
from stm_ray.train.loss import contrastive_step_loss
from stm_ray.train.recipe import MODEL_DIR, STATE_FILE, Recipe, adamw, clear_stale_extension_locks

__all__ = ["MODEL_DIR", "STATE_FILE", "ExpertRecipe", "TwoTower", "clear_stale_extension_locks"]


class TwoTower(nn.Module):
    """Queries and documents through one Embedder in a single module call, so DDP / DeepSpeed see one forward
    per backward (the shared weights are used twice inside it)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, q_features: dict[str, torch.Tensor], d_features: dict[str, torch.Tensor]):
        return self.embedder(q_features), self.embedder(d_features)


class ExpertRecipe(Recipe):
    """One expert (see :func:`stm_ray.train.experts.train_expert`). Its own keys of the config: ``model``,
    ``instruction_pool``, ``saved_query_instruction``."""

    kind, settings = "expert", TrainConfig

    def model(self) -> nn.Module:
        from stm_ray.modeling.embedder import Embedder

        tcfg = self.cfg
        mcfg = ModelConfig.model_validate(self.config["model"])
        # fp32 weights; bf16 comes from autocast (DDP) or DeepSpeed's bf16 on GPU
        emb = Embedder.from_config(mcfg.model_copy(update={"dtype": "float32", "device": str(self.device)}))
        if self.config.get("saved_query_instruction") is not None:
            emb.query_instruction = self.config["saved_query_instruction"]
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
        self.emb, self.lora = emb, tcfg.lora is not None
        return TwoTower(emb)

    def data(self, epoch: int) -> list:
        return plan_batches(self.rows.tasks, self.cfg.batch_size, self.world, self.cfg.seed, epoch)

    def optimizer(self, params: list[nn.Parameter]):
        tcfg = self.cfg
        warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else int(round(tcfg.warmup_ratio * self.total))
        return adamw(params, tcfg.learning_rate, tcfg.weight_decay, self.total, warmup)

    def step(self, model: nn.Module, batch, step: int) -> torch.Tensor:
        tcfg, device, emb = self.cfg, self.device, self.emb
        wb = build_batch(self.rows, worker_slice(batch, self.rank, self.world), n_neg=tcfg.negatives_per_query,
                         instruction_mode=tcfg.instruction_mode, fixed_instruction=emb.query_instruction,
                         pool=self.config.get("instruction_pool") or [], seed=tcfg.seed, step=step)
        valid = wb.doc_valid.to(device)

        def loss_fn(q: torch.Tensor, d_rows: torch.Tensor) -> torch.Tensor:
            d = d_rows.new_zeros((len(valid), d_rows.shape[-1])).index_put((valid.nonzero().squeeze(1),), d_rows)
            return contrastive_step_loss(q, d, n_neg=wb.n_neg, doc_valid=valid, doc_keys=wb.doc_keys.to(device),
                                         temperature=tcfg.temperature, gather=tcfg.gather_across_workers,
                                         dims=tcfg.matryoshka_dims, teacher=wb.teacher, distill=tcfg.distill)

        if tcfg.grad_cache:
            return grad_cache_step(model, emb.tokenize, wb.queries, wb.docs, wb.doc_valid, wb.n_neg, tcfg.grad_cache,
                                   loss_fn, device=device, autocast=self.autocast,
                                   backward=deepspeed_backward(self.engine) if self.engine is not None else None)
        qf = {k: v.to(device) for k, v in emb.tokenize(wb.queries).items()}
        df = {k: v.to(device) for k, v in emb.tokenize(wb.docs).items()}
        with self.autocast:
            q, d_valid = model(qf, df)
        loss = loss_fn(q, d_valid)
        self.backward(loss)
        return loss

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        self.emb.eval()
        self.emb.save(folder, extra_metadata={"expert": self.name, "train_steps": state["step"]})
