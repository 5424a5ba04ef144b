"""InfoNCE over cosine similarity with in-batch and hard negatives, optionally gathered across workers, and the
distillation of a teacher's scores next to it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _multi_worker() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every worker along dim 0, in rank order, keeping the autograd graph.

    ``torch.distributed.nn.all_gather`` sends each gathered slice's gradient back to the worker that produced it
    (its backward is a reduce-scatter), so every worker's embeddings receive the gradients of all workers' losses.
    With gradients then averaged over workers (DDP / DeepSpeed), one step equals a single-worker step on the
    global batch. Without an initialised process group this is the identity.
    """
    if not _multi_worker():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``all_gather`` for tensors that carry no gradient (ids, masks)."""
    if not _multi_worker():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def masked_logits(queries: torch.Tensor, docs: torch.Tensor, positive_index: torch.Tensor, *,
                  temperature: float = 0.05, doc_valid: torch.Tensor | None = None,
                  doc_keys: torch.Tensor | None = None, positive_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities of ``queries`` [B, D] to ``docs`` [N, D] divided by ``temperature``, with padding slots
    and false negatives set to -inf (see :func:`info_nce`); a query's positive is never masked."""
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    logits = q @ d.T / temperature
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if doc_valid is not None:
        mask |= ~doc_valid.bool().unsqueeze(0)
    if doc_keys is not None and positive_keys is not None:
        mask |= doc_keys.unsqueeze(0) == positive_keys.unsqueeze(1)
    mask[torch.arange(len(q), device=q.device), positive_index] = False
    return logits.masked_fill(mask, float("-inf"))


def info_nce(queries: torch.Tensor, docs: torch.Tensor, positive_index: torch.Tensor, *, temperature: float = 0.05,
             doc_valid: torch.Tensor | None = None, doc_keys: torch.Tensor | None = None,
             positive_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE loss of ``queries`` [B, D] against candidate ``docs`` [N, D].

    Each query's logits are its cosine similarities to all N docs divided by ``temperature``; the target is
    ``positive_index[i]``. Every other doc is a negative: the query's own hard negatives and the other queries'
    positives and negatives. Embeddings are normalised here, so any pooling output works.

    ``doc_valid`` [N] (bool) masks padding slots. ``doc_keys`` [N] / ``positive_keys`` [B] (int64 text hashes)
    mask false negatives: a doc whose text equals the query's positive (the same document judged for two queries
    of one batch, or a negative that copies it) is not used as a negative.
    """
    logits = masked_logits(queries, docs, positive_index, temperature=temperature, doc_valid=doc_valid,
                           doc_keys=doc_keys, positive_keys=positive_keys)
    return F.cross_entropy(logits, positive_index)


DISTILL_LOSSES = ("kl", "stabilized", "margin_mse")


def distill_loss(logits: torch.Tensor, group_index: torch.Tensor, teacher: torch.Tensor, *, kind: str = "kl",
                 teacher_temperature: float = 1.0) -> torch.Tensor:
    """Distillation of a teacher's scores into the student's ``logits`` [B, N] (cosine / temperature, -inf where
    masked, as :func:`masked_logits` gives them).

    ``group_index`` [B, G]: the column of each query's own candidates, its positive first; ``teacher`` [B, G]: the
    teacher's scores of those candidates (NaN: none). A candidate counts when the teacher scored it and the student
    did not mask it; a query counts when its positive and at least one negative count. Returns the mean over
    counted queries (0 without any):

    * ``kl``: KL(teacher || student) of the softmaxes over the query's candidates;
    * ``stabilized`` (LLM-Embedder): candidates ranked by the teacher (positive first, negatives by score); for
      the k-th, the cross-entropy of the query's whole row (in-batch negatives included) with the k-1 candidates
      above it masked, weighted by the teacher's softmax probability of the candidate; summed over k;
    * ``margin_mse``: squared error between the student's and the teacher's positive - negative margins.
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; losses: {', '.join(DISTILL_LOSSES)}")
    s = logits.gather(1, group_index)
    valid = torch.isfinite(s) & ~torch.isnan(teacher)
    rows = valid[:, 0] & (valid[:, 1:].sum(1) >= 1)
    if not bool(rows.any()):
        return logits.new_zeros(())
    s, valid, logits, group_index = s[rows], valid[rows], logits[rows], group_index[rows]
    t = torch.nan_to_num(teacher[rows].to(s.dtype), nan=0.0) / teacher_temperature
    if kind == "margin_mse":
        pairs = valid[:, :1] & valid[:, 1:]
        student = (s[:, :1] - s[:, 1:])[pairs]
        target = (t[:, :1] - t[:, 1:])[pairs]
        return F.mse_loss(student, target)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    p_teacher = torch.softmax(torch.where(valid, t, neg_inf), dim=-1)
    if kind == "kl":
        log_pt = torch.log_softmax(torch.where(valid, t, neg_inf), dim=-1)
        log_ps = torch.log_softmax(torch.where(valid, s, neg_inf), dim=-1)
        return (p_teacher * torch.where(valid, log_pt - log_ps, torch.zeros_like(s))).sum(1).mean()
    # stabilized: the positive first, then the negatives from the teacher's best to its worst (unscored last)
    neg_rank = torch.where(valid[:, 1:], t[:, 1:], neg_inf).argsort(dim=1, descending=True, stable=True) + 1
    order = torch.cat([torch.zeros_like(neg_rank[:, :1]), neg_rank], dim=1)
    cols, ok, w = group_index.gather(1, order), valid.gather(1, order), p_teacher.gather(1, order)
    total = logits.new_zeros(())
    masked = logits
    for k in range(cols.shape[1]):
        ce = F.cross_entropy(masked, cols[:, k], reduction="none")
        total = total + (w[:, k] * torch.where(ok[:, k], ce, torch.zeros_like(ce))).mean()
        hide = torch.zeros_like(masked, dtype=torch.bool).scatter(1, cols[:, k:k + 1], ok[:, k:k + 1])
        masked = masked.masked_fill(hide, float("-inf"))
    return total


def contrastive_step_loss(q_emb: torch.Tensor, d_emb: torch.Tensor, *, n_neg: int, doc_valid: torch.Tensor,
                          doc_keys: torch.Tensor, temperature: float, gather: bool,
                          dims: list[int] | None = None, teacher: torch.Tensor | None = None,
                          distill=None) -> torch.Tensor:
    """The training loss for one worker's slice of a global batch.

    Layout of a worker's docs: its B positives first, then B×``n_neg`` negative slots (query i's at
    ``B + i*n_neg ...``). With ``gather``, docs, masks and keys of all workers are concatenated in rank order
    and query i of rank r has its positive at ``r*B*(1+n_neg) + i``; each worker's loss is the mean over its own
    queries, so the average over workers is the global-batch loss.

    ``dims`` (Matryoshka, Kusupati et al. 2022; sentence-transformers' MatryoshkaLoss): the sum over those
    dimensions of the loss on the embeddings cut to the first ``dim`` coordinates (renormalised by
    :func:`info_nce`), so that every prefix of the embedding is a retriever of its own.

    ``teacher`` [B, 1 + ``n_neg``] (the group's teacher scores, NaN: none) with ``distill`` (``train.distill``:
    ``loss``, ``weight``, ``teacher_temperature``) adds ``weight`` x :func:`distill_loss` on the full embeddings.
    A query's candidates are on its own worker, so it needs no more gathering than InfoNCE does.
    """
    b = q_emb.shape[0]
    offset = 0
    pos_keys = doc_keys[:b]
    if gather and _multi_worker():
        d_emb = gather_with_grad(d_emb)
        doc_valid = gather_no_grad(doc_valid)
        doc_keys = gather_no_grad(doc_keys)
        offset = dist.get_rank() * b * (1 + n_neg)
    target = torch.arange(b, device=q_emb.device) + offset
    logits = masked_logits(q_emb, d_emb, target, temperature=temperature, doc_valid=doc_valid, doc_keys=doc_keys,
                           positive_keys=pos_keys)
    if not dims:
        loss = F.cross_entropy(logits, target)
    else:
        loss = sum(info_nce(q_emb[:, :k], d_emb[:, :k], target, temperature=temperature, doc_valid=doc_valid,
                            doc_keys=doc_keys, positive_keys=pos_keys) for k in dims)
    if distill is not None and teacher is not None and distill.weight > 0:
        group = torch.cat([target.unsqueeze(1), offset + b + torch.arange(b * n_neg, device=q_emb.device)
                           .reshape(b, n_neg)], dim=1)
        loss = loss + distill.weight * distill_loss(logits, group, teacher.to(logits.device), kind=distill.loss,
                                                    teacher_temperature=distill.teacher_temperature)
    return loss
