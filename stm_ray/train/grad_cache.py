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
never straddle two forward passes and padding stays per mini-batch. Their size is a number of queries
(``train.grad_cache: 8``) or a token budget (``train.grad_cache: "4096 tokens"``): consecutive queries are grouped
while the padded tensors of the group's forward (queries × longest query + documents × longest document) stay within
the budget, so long documents get smaller groups and short ones larger (a query whose own texts exceed the budget
forms a group alone).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stm_ray.config import grad_cache_size


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


def _slots(a: int, b: int, n_queries: int, n_neg: int) -> torch.Tensor:
    """Document slots of queries ``[a, b)``: their positives, then their ``n_neg`` negative slots each."""
    return torch.cat([torch.arange(a, b), n_queries + torch.arange(a * n_neg, b * n_neg)])


def token_bounds(q_lens: torch.Tensor, d_lens: torch.Tensor, n_neg: int, doc_valid: torch.Tensor,
                 budget: int) -> list[tuple[int, int]]:
    """Consecutive query ranges ``[a, b)`` whose padded forward (``queries × longest query + documents × longest
    document``) stays within ``budget`` tokens; ``d_lens`` per document slot (0 for empty slots)."""
    n_queries = len(q_lens)
    valid = doc_valid.bool().cpu()
    bounds: list[tuple[int, int]] = []
    a = q_max = d_max = n_docs = 0
    for i in range(n_queries):
        slots = _slots(i, i + 1, n_queries, n_neg)
        lens = d_lens[slots[valid[slots]]]
        q_i, d_i, k_i = int(q_lens[i]), int(lens.max()) if len(lens) else 0, len(lens)
        if i > a and (i - a + 1) * max(q_max, q_i) + (n_docs + k_i) * max(d_max, d_i) > budget:
            bounds.append((a, i))
            a, q_max, d_max, n_docs = i, 0, 0, 0
        q_max, d_max, n_docs = max(q_max, q_i), max(d_max, d_i), n_docs + k_i
    if n_queries:
        bounds.append((a, n_queries))
    return bounds


def mini_batches(n_queries: int, n_neg: int, doc_valid: torch.Tensor,
                 size: int | list[tuple[int, int]]) -> list[tuple[slice, torch.Tensor]]:
    """``(query slice, indices of its valid documents)`` per group of ``size`` queries (or per ``[a, b)`` range
    of a list).

    Document slots are laid out as ``n_queries`` positives, then ``n_neg`` negative slots per query; valid
    documents are numbered in slot order (the order of :class:`~stm_ray.train.batching.WorkerBatch.docs`).
    """
    valid = doc_valid.bool().cpu()
    number = torch.cumsum(valid.long(), 0) - 1  # slot -> index among the valid documents
    if isinstance(size, int):
        size = [(a, min(a + size, n_queries)) for a in range(0, n_queries, size)]
    out = []
    for a, b in size:
        slots = _slots(a, b, n_queries, n_neg)
        slots = slots[valid[slots]]
        out.append((slice(a, b), number[slots]))
    return out


def plan_mini_batches(tokenize: Callable[[list[str]], dict[str, torch.Tensor]], queries: list[str], docs: list[str],
                      doc_valid: torch.Tensor, n_neg: int, size: int | str) -> list[tuple[slice, torch.Tensor]]:
    """The mini-batches of one step for ``train.grad_cache`` (queries or a token budget)."""
    unit, n = grad_cache_size(size)
    if unit == "queries":
        return mini_batches(len(queries), n_neg, doc_valid, n)
    q_lens = tokenize(queries)["attention_mask"].sum(1)
    valid = doc_valid.bool().cpu()
    d_lens = torch.zeros(len(valid), dtype=torch.long)
    if docs:
        d_lens[valid] = tokenize(docs)["attention_mask"].sum(1).cpu()
    return mini_batches(len(queries), n_neg, doc_valid, token_bounds(q_lens.cpu(), d_lens, n_neg, valid, n))


def grad_cache_step(model: torch.nn.Module, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                    queries: list[str], docs: list[str], doc_valid: torch.Tensor, n_neg: int, size: int | str,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, device: torch.device,
                    autocast=None, backward: Callable[[torch.Tensor, bool], None] | None = None) -> torch.Tensor:
    """One GradCache step for a worker's slice: returns the loss (detached); parameter gradients are accumulated
    as a plain ``loss.backward()`` on the whole slice would.

    ``model(q_features, d_features) -> (q_emb, d_emb)`` (the two-tower module, DDP- or DeepSpeed-wrapped);
    ``loss_fn(q_emb [B, D], d_emb [valid docs, D]) -> loss``; ``backward(surrogate, last)`` runs one mini-batch's
    backward (default: ``surrogate.backward()`` inside DDP's ``no_sync`` for all but the last). ``size``: queries
    per mini-batch, or a token budget (``"4096 tokens"``, see :func:`plan_mini_batches`).
    """
    autocast = autocast or nullcontext()
    groups = plan_mini_batches(tokenize, queries, docs, doc_valid, n_neg, size)
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
