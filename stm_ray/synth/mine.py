"""Hard-negative mining: BM25 (bm25s) and dense (the Embedder, exact search), with NV-Retriever's positive-aware
false-negative filter (TopK-PercPos: drop candidates scoring above ``margin`` x the positive's score).

These are plain functions over lists and arrays; the Synthesize stage runs them inside Ray Data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class MinedNegatives:
    """Per query: the chosen negative doc indices (into the corpus), best first, and how many were filtered."""

    indices: list[list[int]]
    dropped_as_false_negative: int


def select_negatives(cand_idx: np.ndarray, cand_scores: np.ndarray, positive_score: np.ndarray,
                     judged: Sequence[set[int]], *, count: int, margin: float) -> MinedNegatives:
    """From ranked candidates, keep the first ``count`` that are not judged relevant and score at most
    ``margin`` x the query's positive score (NV-Retriever TopK-PercPos)."""
    out, dropped = [], 0
    for qi in range(cand_idx.shape[0]):
        limit = margin * float(positive_score[qi])
        keep = []
        for j, s in zip(cand_idx[qi], cand_scores[qi]):
            j = int(j)
            if j in judged[qi]:
                continue
            if s > limit:
                dropped += 1
                continue
            keep.append(j)
            if len(keep) == count:
                break
        out.append(keep)
    return MinedNegatives(out, dropped)


def mine_dense(query_emb: np.ndarray, corpus_emb: np.ndarray, positives: Sequence[Sequence[int]],
               judged: Sequence[set[int]], *, depth: int = 50, count: int = 1, margin: float = 0.95) -> MinedNegatives:
    """Dense negatives; a query's positive score is its lowest-scoring judged positive (the strictest filter)."""
    from stm_ray.eval.search import exact_search

    qn = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    cn = corpus_emb / np.linalg.norm(corpus_emb, axis=1, keepdims=True).clip(1e-12)
    pos_score = np.array([min(float(qn[i] @ cn[p]) for p in ps) for i, ps in enumerate(positives)])
    scores, idx = exact_search(qn, cn, top_k=depth + max(len(j) for j in judged))
    return select_negatives(idx, scores, pos_score, judged, count=count, margin=margin)


def mine_bm25(queries: Sequence[str], corpus: Sequence[str], positives: Sequence[Sequence[int]],
              judged: Sequence[set[int]], *, depth: int = 50, count: int = 1, margin: float = 0.95) -> MinedNegatives:
    """BM25 negatives (bm25s, English stopwords); the filter compares BM25 scores with the positive's BM25 score."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus), show_progress=False), show_progress=False)
    q_tokens = bm25s.tokenize(list(queries), show_progress=False)
    k = min(len(corpus), depth + max(len(j) for j in judged))
    idx, scores = retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=0)
    vocab_inv = {v: t for t, v in q_tokens.vocab.items()}
    pos_score = np.empty(len(queries))
    for i, ps in enumerate(positives):
        words = [vocab_inv[t] for t in q_tokens.ids[i]]
        all_scores = retriever.get_scores(words) if words else np.zeros(len(corpus))
        pos_score[i] = min(float(all_scores[p]) for p in ps)
    return select_negatives(np.asarray(idx), np.asarray(scores), pos_score, judged, count=count, margin=margin)
