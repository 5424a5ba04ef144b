"""Exact cosine search, chunked over the corpus and the queries so memory stays bounded."""

from __future__ import annotations

import numpy as np
import torch


def exact_search(query_emb: np.ndarray, corpus_emb: np.ndarray, top_k: int = 100, corpus_chunk_size: int = 50_000,
                 query_chunk_size: int = 1024, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents per query by cosine similarity: (scores [nq, k], indices [nq, k]), best first.

    Peak extra memory is ``query_chunk_size x corpus_chunk_size`` floats, whatever the corpus size.
    """
    q = torch.as_tensor(query_emb, dtype=torch.float32)
    c = torch.as_tensor(corpus_emb, dtype=torch.float32)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=-1)
        c = torch.nn.functional.normalize(c, dim=-1)
    k = min(top_k, c.shape[0])
    all_scores = np.empty((q.shape[0], k), dtype=np.float32)
    all_idx = np.empty((q.shape[0], k), dtype=np.int64)
    for qs in range(0, q.shape[0], query_chunk_size):
        qb = q[qs:qs + query_chunk_size]
        best_s = torch.full((qb.shape[0], 0), -float("inf"))
        best_i = torch.zeros((qb.shape[0], 0), dtype=torch.long)
        for cs in range(0, c.shape[0], corpus_chunk_size):
            scores = qb @ c[cs:cs + corpus_chunk_size].T
            s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + cs], dim=1)
            if best_s.shape[1] > k:
                best_s, pos = torch.topk(best_s, k, dim=1)
                best_i = torch.gather(best_i, 1, pos)
        all_scores[qs:qs + qb.shape[0]] = best_s.numpy()
        all_idx[qs:qs + qb.shape[0]] = best_i.numpy()
    return all_scores, all_idx


def to_run(query_ids: list[str], corpus_ids: list[str], scores: np.ndarray, idx: np.ndarray) -> dict[str, dict[str, float]]:
    """{qid: {docid: score}} as trec_eval and mteb take it."""
    return {qid: {corpus_ids[j]: float(s) for s, j in zip(srow, irow)} for qid, srow, irow in zip(query_ids, scores, idx)}
