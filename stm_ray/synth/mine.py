"""Hard-negative mining: BM25 (bm25s) and dense (the Embedder, exact search), with NV-Retriever's positive-aware
false-negative filter (TopK-PercPos: drop candidates scoring above ``margin`` x the positive's score).

These are plain functions over lists and arrays; :class:`MineBatch` runs them as a Ray Data stage (one index per
actor, built once, mining a batch of (query, positive) rows at a time).
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
    dropped_per_query: list[int]

    @property
    def dropped_as_false_negative(self) -> int:
        return sum(self.dropped_per_query)


def select_negatives(cand_idx: np.ndarray, cand_scores: np.ndarray, positive_score: np.ndarray,
                     judged: Sequence[set[int]], *, count: int, margin: float) -> MinedNegatives:
    """From ranked candidates, keep the first ``count`` that are not judged relevant and score at most
    ``margin`` x the query's positive score (NV-Retriever TopK-PercPos)."""
    out, per_query = [], []
    for qi in range(cand_idx.shape[0]):
        limit = margin * float(positive_score[qi])
        keep, dropped = [], 0
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
        per_query.append(dropped)
    return MinedNegatives(out, per_query)


def mine_dense(query_emb: np.ndarray, corpus_emb: np.ndarray, positives: Sequence[Sequence[int]],
               judged: Sequence[set[int]], *, depth: int = 50, count: int = 1, margin: float = 0.95) -> MinedNegatives:
    """Dense negatives; a query's positive score is its lowest-scoring judged positive (the strictest filter)."""
    from stm_ray.eval.search import exact_search

    qn = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    cn = corpus_emb / np.linalg.norm(corpus_emb, axis=1, keepdims=True).clip(1e-12)
    pos_score = np.array([min(float(qn[i] @ cn[p]) for p in ps) for i, ps in enumerate(positives)])
    scores, idx = exact_search(qn, cn, top_k=depth + max(len(j) for j in judged))
    return select_negatives(idx, scores, pos_score, judged, count=count, margin=margin)


class BM25Index:
    """A bm25s index over a corpus, built once (English stopwords), then mined for many query batches."""

    def __init__(self, corpus: Sequence[str]) -> None:
        import bm25s

        self.size = len(corpus)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(corpus), show_progress=False), show_progress=False)

    def mine(self, queries: Sequence[str], positives: Sequence[Sequence[int]], judged: Sequence[set[int]], *,
             depth: int = 50, count: int = 1, margin: float = 0.95) -> MinedNegatives:
        """The filter compares BM25 scores with the positive's BM25 score."""
        import bm25s

        q_tokens = bm25s.tokenize(list(queries), show_progress=False)
        k = min(self.size, depth + max(len(j) for j in judged))
        idx, scores = self.retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=0)
        vocab_inv = {v: t for t, v in q_tokens.vocab.items()}
        pos_score = np.empty(len(queries))
        for i, ps in enumerate(positives):
            words = [vocab_inv[t] for t in q_tokens.ids[i]]
            all_scores = self.retriever.get_scores(words) if words else np.zeros(self.size)
            pos_score[i] = min(float(all_scores[p]) for p in ps)
        return select_negatives(np.asarray(idx), np.asarray(scores), pos_score, judged, count=count, margin=margin)


def mine_bm25(queries: Sequence[str], corpus: Sequence[str], positives: Sequence[Sequence[int]],
              judged: Sequence[set[int]], *, depth: int = 50, count: int = 1, margin: float = 0.95) -> MinedNegatives:
    """BM25 negatives (bm25s, English stopwords) with a one-off index; see :class:`BM25Index` to reuse one."""
    return BM25Index(corpus).mine(queries, positives, judged, depth=depth, count=count, margin=margin)


MINED_SOURCE = {"bm25": "mined-bm25", "dense": "mined-dense"}


class MineBatch:
    """Ray Data stage (stateful ``map_batches`` UDF): hard negatives for a batch of (query, positive) rows.

    Required input columns: ``task``, ``query``, ``positive_id``, ``judged_ids`` (every document judged for the
    query, at any grade: never mined). Adds ``mined_negatives`` (texts, best first, deduplicated across miners),
    ``mined_sources`` (``mined-bm25`` / ``mined-dense``) and ``false_negatives_dropped``. Each miner adds up to
    ``count`` documents the miners before it did not pick.

    ``corpora`` maps a task to ``{"ids": ref, "texts": ref, "embeddings": ref or None}`` (Ray object refs: the
    corpus is put in the object store once and shared by every actor); each actor builds its BM25 indexes once.
    Dense mining encodes the batch's queries with the base model (``model_kwargs``: Embedder.from_pretrained
    arguments; its query instruction applies) and searches the precomputed corpus embeddings exactly.
    """

    REQUIRED = ("task", "query", "positive_id", "judged_ids")

    def __init__(self, corpora: dict, miners: Sequence[str], *, model_kwargs: dict | None = None,
                 depth: int = 50, count: int = 1, margin: float = 0.95) -> None:
        import ray

        self.miners = list(miners)
        self.depth, self.count, self.margin = depth, count, margin
        self.tasks: dict[str, dict] = {}
        for task, refs in corpora.items():
            ids, texts = ray.get(refs["ids"]), ray.get(refs["texts"])
            entry = {"index": {d: i for i, d in enumerate(ids)}, "texts": texts}
            if "bm25" in self.miners:
                entry["bm25"] = BM25Index(texts)
            if "dense" in self.miners:
                entry["emb"] = ray.get(refs["embeddings"])
            self.tasks[task] = entry
        self.embedder = None
        if "dense" in self.miners:
            from stm_ray.modeling import Embedder

            self.embedder = Embedder.from_pretrained(**(model_kwargs or {}))

    @staticmethod
    def output(batch, negatives: list[list[str]] | None = None, sources: list[list[str]] | None = None,
               dropped: list[int] | None = None):
        """``batch`` with the three mined columns; without values: no mined negatives (mining off, or rows that
        skip mining but share the generation stage's schema)."""
        import pyarrow as pa

        n = batch.num_rows
        strings = pa.list_(pa.string())
        return (batch.append_column("mined_negatives", pa.array(negatives or [[]] * n, strings))
                .append_column("mined_sources", pa.array(sources or [[]] * n, strings))
                .append_column("false_negatives_dropped", pa.array(dropped or [0] * n, pa.int32())))

    def __call__(self, batch):
        missing = [c for c in self.REQUIRED if c not in batch.column_names]
        if missing:
            raise ValueError(f"MineBatch needs columns {missing}; the batch has {batch.column_names}")
        rows = batch.to_pylist()
        negs: list[list[str]] = [[] for _ in rows]
        srcs: list[list[str]] = [[] for _ in rows]
        dropped = [0] * len(rows)
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r["task"], []).append(i)
        for task, members in by_task.items():
            t = self.tasks[task]
            pos = [[t["index"][rows[i]["positive_id"]]] for i in members]
            judged = [{t["index"][d] for d in rows[i]["judged_ids"] if d in t["index"]} | set(p)
                      for i, p in zip(members, pos)]
            queries = [rows[i]["query"] for i in members]
            seen = [set() for _ in members]
            for m, miner in enumerate(self.miners):
                # ask for extra candidates so that each miner adds `count` documents the earlier ones did not pick
                want = self.count * (m + 1)
                if miner == "bm25":
                    mined = t["bm25"].mine(queries, pos, judged, depth=self.depth, count=want, margin=self.margin)
                else:
                    q_emb = self.embedder.encode_queries(queries)
                    mined = mine_dense(q_emb, t["emb"], pos, judged, depth=self.depth, count=want,
                                       margin=self.margin)
                for k, i in enumerate(members):
                    dropped[i] += mined.dropped_per_query[k]
                    fresh = [j for j in mined.indices[k] if j not in seen[k]][:self.count]
                    for j in fresh:
                        seen[k].add(j)
                        negs[i].append(t["texts"][j])
                        srcs[i].append(MINED_SOURCE[miner])
        return self.output(batch, negs, srcs, dropped)
