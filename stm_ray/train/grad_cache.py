"""GradCache (Gao et al., 2021): a contrastive step over a large batch in the memory of a small one.

1. Embed the worker's whole slice of the global batch in mini-batches **without** autograd graphs.
2. Compute the loss on those embeddings (gathered across workers like the plain path) and its gradient with
   respect to each embedding: one backward through the loss only, cheap.
3. For each mini-batch again, forward **with** a graph and back-propagate ``sum(embedding * its gradient)``: the
   chain rule gives the parameters exactly the gradients of the plain path's backward on the whole batch.

Each mini-batch's random state (dropout, LoRA dropout) is saved in pass 1 and restored in pass 3, so both passes
see the same masks. Gradients are synchronised once per step: DDP's ``no_sync`` for every mini-batch but the last,
DeepSpeed's gradient-accumulation boundary set on the last only, then one optimizer step as before.

Mini-batches are groups of queries with their own documents (positive and negative slots), so a query's texts
never straddle two forward passes and padding stays per mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class RandState:
    """The torch random state of the CPU (and the current CUDA device) at a point in time."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def mini_batches(n_queries: int, n_neg: int, doc_valid: torch.Tensor, size: int) -> list[tuple[slice, torch.Tensor]]:
    """``(query slice, indices of its valid documents)`` per group of ``size`` queries.

    Document slots are laid out as ``n_queries`` positives, then ``n_neg`` negative slots per query; valid
    documents are numbered in slot order (the order of :class:`~stm_ray.train.batching.WorkerBatch.docs`).
    """
    valid = doc_valid.bool().cpu()
    number = torch.cumsum(valid.long(), 0) - 1  # slot -> index among the valid documents
    out = []
    for a in range(0, n_queries, size):
        b = min(a + size, n_queries)
        slots = torch.cat([torch.arange(a, b), n_queries + torch.arange(a * n_neg, b * n_neg)])
        slots = slots[valid[slots]]
        out.append((slice(a, b), number[slots]))
    return out


def grad_cache_step(model: torch.nn.Module, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                    queries: list[str], docs: list[str], doc_valid: torch.Tensor, n_neg: int, size: int,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, device: torch.device,
                    autocast=None, backward: Callable[[torch.Tensor, bool], None] | None = None) -> torch.Tensor:
    """One GradCache step for a worker's slice: returns the loss (detached); parameter gradients are accumulated
    as a plain ``loss.backward()`` on the whole slice would.

    ``model(q_features, d_features) -> (q_emb, d_emb)`` (the two-tower module, DDP- or DeepSpeed-wrapped);
    ``loss_fn(q_emb [B, D], d_emb [valid docs, D]) -> loss``; ``backward(surrogate, last)`` runs one mini-batch's
    backward (default: ``surrogate.backward()`` inside DDP's ``no_sync`` for all but the last).
    """
    autocast = autocast or nullcontext()
    groups = mini_batches(len(queries), n_neg, doc_valid, size)
    states: list[RandState] = []
    q_parts: list[torch.Tensor] = []
    d_rows: torch.Tensor | None = None
    with torch.no_grad():
        for qs, ds in groups:
            states.append(RandState.capture(device))
            with autocast:
                q, d = model(_to(tokenize(queries[qs]), device), _to(tokenize([docs[i] for i in ds]), device))
            q_parts.append(q.float())
            if d_rows is None:
                d_rows = q.new_zeros((len(docs), d.shape[-1]), dtype=torch.float32)
            d_rows[ds.to(d_rows.device)] = d.float()
    q_leaf = torch.cat(q_parts).requires_grad_(True)
    d_leaf = d_rows.requires_grad_(True)
    loss = loss_fn(q_leaf, d_leaf)
    loss.backward()
    q_grad, d_grad = q_leaf.grad, d_leaf.grad
    after = RandState.capture(device)
    backward = backward or _ddp_backward(model)
    for i, ((qs, ds), state) in enumerate(zip(groups, states)):
        state.restore(device)
        with autocast:
            q, d = model(_to(tokenize(queries[qs]), device), _to(tokenize([docs[j] for j in ds]), device))
        surrogate = (q.float() * q_grad[qs]).sum() + (d.float() * d_grad[ds.to(d_grad.device)]).sum()
        backward(surrogate, i == len(groups) - 1)
    after.restore(device)  # the random stream continues as after pass 1, as in the plain path
    return loss.detach()


def _to(features: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in features.items()}


def _ddp_backward(model: torch.nn.Module) -> Callable[[torch.Tensor, bool], None]:
    def run(surrogate: torch.Tensor, last: bool) -> None:
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            surrogate.backward()
    return run


def deepspeed_backward(engine) -> Callable[[torch.Tensor, bool], None]:
    """Mini-batch backward for a DeepSpeed engine: gradients are reduced at the last mini-batch only (the
    accumulation boundary), unscaled (the surrogate already carries the whole batch's loss gradient)."""
    def run(surrogate: torch.Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(surrogate, scale_wrt_gas=False)
    return run
