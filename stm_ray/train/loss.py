"""InfoNCE over cosine similarity with in-batch and hard negatives, optionally gathered across workers."""

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
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    logits = q @ d.T / temperature
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if doc_valid is not None:
        mask |= ~doc_valid.bool().unsqueeze(0)
    if doc_keys is not None and positive_keys is not None:
        mask |= doc_keys.unsqueeze(0) == positive_keys.unsqueeze(1)
    mask[torch.arange(len(q), device=q.device), positive_index] = False
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def contrastive_step_loss(q_emb: torch.Tensor, d_emb: torch.Tensor, *, n_neg: int, doc_valid: torch.Tensor,
                          doc_keys: torch.Tensor, temperature: float, gather: bool,
                          dims: list[int] | None = None) -> torch.Tensor:
    """The training loss for one worker's slice of a global batch.

    Layout of a worker's docs: its B positives first, then B×``n_neg`` negative slots (query i's at
    ``B + i*n_neg ...``). With ``gather``, docs, masks and keys of all workers are concatenated in rank order
    and query i of rank r has its positive at ``r*B*(1+n_neg) + i``; each worker's loss is the mean over its own
    queries, so the average over workers is the global-batch loss.

    ``dims`` (Matryoshka, Kusupati et al. 2022; sentence-transformers' MatryoshkaLoss): the sum over those
    dimensions of the loss on the embeddings cut to the first ``dim`` coordinates (renormalised by
    :func:`info_nce`), so that every prefix of the embedding is a retriever of its own.
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
    if not dims:
        return info_nce(q_emb, d_emb, target, temperature=temperature, doc_valid=doc_valid, doc_keys=doc_keys,
                        positive_keys=pos_keys)
    return sum(info_nce(q_emb[:, :k], d_emb[:, :k], target, temperature=temperature, doc_valid=doc_valid,
                        doc_keys=doc_keys, positive_keys=pos_keys) for k in dims)
