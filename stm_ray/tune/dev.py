"""Dev sets for the searches, and the score every trial reports.

A trial's score is mean NDCG@10 over the configured tasks on their dev split (Recall@10 breaks ties). Large corpora
are pooled (see :class:`stm_ray.config.SearchConfig`): judged documents, BM25 top candidates of each dev query, and
a deterministic random fill, so that a trial costs seconds rather than a full-corpus encode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from stm_ray.data import RetrievalSplit, RetrievalTask, load_task
from stm_ray.data.task import stable_fraction

log = logging.getLogger(__name__)

PRIMARY, TIEBREAK = "ndcg_at_10", "recall_at_10"


def pooled_split(split: RetrievalSplit, size: int | None, depth: int, seed: int = 13) -> RetrievalSplit:
    """``split`` with its corpus cut to at most ``size`` documents (judged + BM25 top ``depth`` + random fill)."""
    n = len(split.corpus_ids)
    if size is None or n <= size:
        return split
    pos = {d: i for i, d in enumerate(split.corpus_ids)}
    keep: dict[int, None] = {}
    for rel in split.relevant.values():
        for d in rel:
            if d in pos:
                keep[pos[d]] = None
    if depth > 0 and split.queries:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(split.corpus, show_progress=False), show_progress=False)
        idx, _ = retriever.retrieve(bm25s.tokenize(split.queries, show_progress=False), k=min(depth, n),
                                    show_progress=False, n_threads=0)
        for row in np.asarray(idx):
            for j in row:
                if len(keep) >= size:
                    break
                keep[int(j)] = None
    if len(keep) < size:
        rest = sorted((i for i in range(n) if i not in keep),
                      key=lambda i: stable_fraction(split.corpus_ids[i], f"devpool{seed}"))
        for i in rest[:size - len(keep)]:
            keep[i] = None
    order = sorted(keep)
    return RetrievalSplit(split.task, split.split, split.query_ids, split.queries,
                          [split.corpus_ids[i] for i in order], [split.corpus[i] for i in order], split.relevant)


def dev_sets(cfg, loaded: dict[str, RetrievalTask] | None = None) -> list[RetrievalSplit]:
    """The dev split of every task of ``cfg.data.tasks``, capped and pooled as ``cfg.search`` says
    (``loaded``: tasks the caller has already loaded, by spec)."""
    s = cfg.search
    out = []
    for spec in cfg.data.tasks:
        task = (loaded or {}).get(spec) or load_task(spec, strict=cfg.data.strict, run_dir=cfg.run_dir)
        sp = task.split(cfg.data.dev_split, max_queries=s.dev_max_queries, seed=s.seed)
        if not len(sp):
            raise ValueError(f"task {spec}: no dev queries with a relevant document in split {cfg.data.dev_split!r}")
        pooled = pooled_split(sp, s.dev_corpus_size, s.dev_pool_depth, s.seed)
        pooled.task = spec
        log.info("dev set %s: %d queries, %d of %d documents", spec, len(pooled), len(pooled.corpus), len(sp.corpus))
        out.append(pooled)
    return out


def cached_dev_embeddings(cfg, sets: list[RetrievalSplit], model_cfg,
                          loaded: dict[str, RetrievalTask] | None = None) -> list[np.ndarray] | None:
    """``model_cfg``'s embeddings of each dev set's documents, cut from the corpus embeddings mining cached for it
    (:func:`stm_ray.synth.negatives.cached_corpus_embeddings`); None unless every set has them."""
    from stm_ray.synth.negatives import cached_corpus_embeddings

    out = []
    for sp in sets:
        task = (loaded or {}).get(sp.task) or load_task(sp.task, strict=cfg.data.strict, run_dir=cfg.run_dir)
        full = cached_corpus_embeddings(cfg, sp.task, model_cfg, task)
        if full is None:
            return None
        pos = {d: i for i, d in enumerate(task.corpus.column("_id").to_pylist())}
        if any(d not in pos for d in sp.corpus_ids):
            return None
        out.append(full[[pos[d] for d in sp.corpus_ids]])
    log.info("dev sets: the corpus embeddings mining cached for %s are reused", model_cfg.name_or_path)
    return out


@dataclass
class DevScore:
    """Mean NDCG@10 and Recall@10 over tasks, and both per task."""

    ndcg_at_10: float
    recall_at_10: float
    per_task: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return {PRIMARY: self.ndcg_at_10, TIEBREAK: self.recall_at_10, "per_task": self.per_task}


def score_embedder(emb, sets: list[RetrievalSplit], *, corpus_embs: list[np.ndarray] | None = None,
                   dimension: int | None = None) -> DevScore:
    """Score an Embedder on the dev sets (``corpus_embs`` reuses document embeddings per set; ``dimension`` scores
    embeddings cut to that many coordinates)."""
    from stm_ray.eval.evaluate import evaluate_split

    per_task = {}
    for i, sp in enumerate(sets):
        res = evaluate_split(emb, sp, k_values=(10,), top_k=10, corpus_emb=None if corpus_embs is None else corpus_embs[i],
                             dimension=dimension)
        per_task[sp.task] = {PRIMARY: res.scores[PRIMARY], TIEBREAK: res.scores[TIEBREAK]}
    return DevScore(float(np.mean([v[PRIMARY] for v in per_task.values()])),
                    float(np.mean([v[TIEBREAK] for v in per_task.values()])), per_task)


def score_folders(paths: dict[str, str], sets: list[RetrievalSplit], model_kwargs: dict[str, Any], *, cpus: int,
                  gpus: float = 0.0, dimension: int | None = None) -> dict[str, DevScore]:
    """Dev scores of saved models ({name: folder}), one Ray task each. They are scheduled outside any placement
    group of the caller (a Tune trial that only drives Ray Train holds almost no CPU)."""
    import ray

    @ray.remote(num_cpus=cpus, num_gpus=gpus)
    def score(path: str, dev) -> DevScore:
        import torch

        from stm_ray.modeling import Embedder

        torch.set_num_threads(cpus)
        return score_embedder(Embedder.from_pretrained(path, **model_kwargs), dev, dimension=dimension)

    ref = ray.put(sets)
    refs = {n: score.options(scheduling_strategy="DEFAULT").remote(p, ref) for n, p in paths.items()}
    return {n: ray.get(r) for n, r in refs.items()}


def objective(ndcg: float, recall: float) -> float:
    """One number for Tune's searcher: NDCG@10 with Recall@10 as a tie-breaker far below its resolution."""
    return ndcg + 1e-6 * recall
