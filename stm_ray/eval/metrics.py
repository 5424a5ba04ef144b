"""Retrieval metrics computed as trec_eval / pytrec_eval (and so mteb) compute them.

- Ranking: score descending, ties broken by document id descending (trec_eval's order).
- NDCG@k: gain is the relevance label itself (linear, not 2^rel - 1), discount log2(rank + 1); the ideal DCG
  ranks all judged documents by label. Recall@k counts documents with label >= 1.
- A query's scores are averaged over the queries in the qrels that have at least one relevant document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def rank(run: Mapping[str, float]) -> list[str]:
    return [d for d, _ in sorted(run.items(), key=lambda x: (-x[1], _neg(x[0])))]


class _neg(str):
    """A string that sorts in reverse: ties on score go to the larger document id first, as in trec_eval."""

    def __lt__(self, other: str) -> bool:  # type: ignore[override]
        return str.__gt__(self, other)


def ndcg_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    dcg = sum(max(rel.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rel.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rel.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rel.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def accuracy_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    return 1.0 if any(rel.get(d, 0) > 0 for d in ranked[:k]) else 0.0


METRICS = {"ndcg_at": ndcg_at_k, "recall_at": recall_at_k, "mrr_at": mrr_at_k, "accuracy_at": accuracy_at_k}


def evaluate_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                 k_values: Sequence[int] = (1, 3, 5, 10, 100)) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean metrics over judged queries, and per-query values (for significance tests and plots)."""
    per_query: dict[str, dict[str, float]] = {}
    for qid, rel in qrels.items():
        if not any(r > 0 for r in rel.values()):
            continue
        ranked = rank(run.get(qid, {}))
        per_query[qid] = {f"{name}_{k}": fn(ranked, rel, k) for name, fn in METRICS.items() for k in k_values}
    if not per_query:
        raise ValueError("no judged query with a relevant document")
    keys = next(iter(per_query.values())).keys()
    means = {key: float(np.mean([v[key] for v in per_query.values()])) for key in keys}
    return means, per_query
