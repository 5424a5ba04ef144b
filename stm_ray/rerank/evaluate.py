"""The rerank stage: the retriever's top-k for each test query, re-scored by each reranker; NDCG@10 of the retriever
alone vs retriever + reranker, in mteb format under ``<run_dir>/eval/rerank-<name>/<task>.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from stm_ray.records import read_record
from stm_ray.stage import Fingerprint, combine, decide, fingerprint
from stm_ray.storage import run_path

log = logging.getLogger("stm_ray.rerank")


def retrieve(embedder, split, top_k: int, *, corpus_chunk_size: int = 50_000,
             show_progress: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores [nq, k], corpus indices [nq, k], seconds) of the retriever's top ``top_k``."""
    from stm_ray.eval.search import exact_search

    t0 = time.perf_counter()
    c = embedder.encode_corpus(split.corpus, show_progress=show_progress)
    q = embedder.encode_queries(split.queries, show_progress=show_progress)
    s, i = exact_search(q, c, top_k=top_k, corpus_chunk_size=corpus_chunk_size)
    return s, i, time.perf_counter() - t0


def rerank_candidates(reranker, split, idx: np.ndarray, *, show_progress: bool = False) -> tuple[np.ndarray, float]:
    """Reranker scores of every (query, candidate) of ``idx`` [nq, k], and the seconds it took."""
    t0 = time.perf_counter()
    qs = [split.queries[r] for r in range(idx.shape[0]) for _ in range(idx.shape[1])]
    ds = [split.corpus[j] for row in idx for j in row]
    scores = reranker.score_pairs(qs, ds, show_progress=show_progress).reshape(idx.shape)
    return scores, time.perf_counter() - t0


def reranked_run(split, idx: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """{qid: {docid: reranker score}} over the candidates (documents outside the top-k are not ranked)."""
    return {qid: {split.corpus_ids[j]: float(s) for j, s in zip(row, srow)}
            for qid, row, srow in zip(split.query_ids, idx, scores)}


def rerank_fingerprint(cfg, retriever: str, reranker: str, task: str) -> Fingerprint:
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    return fingerprint("rerank", cfg, {"retriever": model_fingerprint(retriever), "reranker": model_fingerprint(reranker),
                                       "task": task, "data": task_fingerprint(task, cfg.run_dir)})


def resolve_retriever(cfg) -> tuple[str, str]:
    """(label, model) of what the rerank stage reranks (``rerank.retriever``)."""
    choice = cfg.rerank.retriever
    if choice == "base":
        return "base", cfg.model.name_or_path
    if choice == "merged":
        from stm_ray.merge.search import current_merged

        merged = current_merged(cfg)
        if merged:
            return "merged", merged
        log.warning("rerank.retriever=merged but the run has no current merged model: reranking the base model")
        return "base", cfg.model.name_or_path
    return Path(choice).name or choice, choice


def rerank_task(cfg, retriever: str, rerankers: dict[str, Any], task: str, *, show_progress: bool = True,
                outputs: dict[str, Path] | None = None, records: dict[str, dict] | None = None,
                embedder=None) -> dict[str, Any]:
    """Retrieve once, rerank with each of ``rerankers`` ({name: folder or Reranker}); returns
    ``{"retriever": scores, "<name>": scores, ...}`` with ``seconds_per_query`` and writes mteb-format files to
    ``outputs[name]`` (each with the retriever's scores beside its own)."""
    from stm_ray.data import load_task
    from stm_ray.eval.evaluate import EvalResult
    from stm_ray.eval.metrics import evaluate_run
    from stm_ray.eval.search import to_run
    from stm_ray.modeling import Embedder
    from stm_ray.rerank.model import load_reranker
    from stm_ray.utils import atomic_write_json

    rcfg = cfg.rerank
    t = load_task(task, strict=cfg.data.strict, run_dir=cfg.run_dir)
    split = t.split(cfg.data.test_split, max_queries=rcfg.max_queries or cfg.data.max_queries)
    emb = embedder or Embedder.from_config(cfg.model.model_copy(update={"name_or_path": retriever}))
    k_values = tuple(cfg.eval.k_values)
    log.info("rerank %s: retrieving the top %d of %d documents for %d queries with %s", task, rcfg.top_k,
             len(split.corpus), len(split), retriever)
    s, idx, t_retrieve = retrieve(emb, split, rcfg.top_k, corpus_chunk_size=cfg.eval.corpus_chunk_size,
                                  show_progress=show_progress)
    base_means, _ = evaluate_run(to_run(split.query_ids, split.corpus_ids, s, idx), split.relevant, k_values)
    out: dict[str, Any] = {"retriever": {"scores": base_means, "seconds_per_query": t_retrieve / max(1, len(split))}}
    for name, rr in rerankers.items():
        model = rr if not isinstance(rr, str) else load_reranker(rr, batch_size=rcfg.score_batch_size)
        scores, secs = rerank_candidates(model, split, idx, show_progress=show_progress)
        means, per_query = evaluate_run(reranked_run(split, idx, scores), split.relevant, k_values)
        spq = secs / max(1, len(split))
        log.info("rerank %s with %s: NDCG@10 %.4f -> %.4f (%.3f s per query at k=%d)", task, name,
                 base_means["ndcg_at_10"], means["ndcg_at_10"], spq, rcfg.top_k)
        out[name] = {"scores": means, "seconds_per_query": spq}
        if outputs and name in outputs:
            res = EvalResult(f"{retriever} + {rr if isinstance(rr, str) else name}", task, split.split, means,
                             len(split), len(split.corpus), t_retrieve + secs,
                             {"retrieve_s": t_retrieve, "rerank_s": secs}, per_query)
            doc = res.to_mteb_json()
            doc["stm_ray"].update({"retriever": retriever, "reranker": rr if isinstance(rr, str) else name,
                                   "top_k": rcfg.top_k, "retriever_scores": base_means,
                                   "seconds_per_query": spq, **((records or {}).get(name) or {})})
            atomic_write_json(outputs[name], doc)
    return out


def rerank_models(cfg, rerankers: dict[str, str] | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """The rerank stage: every reranker ({name: folder}; default: the run's, :func:`current_rerankers`) over the
    retriever's top ``rerank.top_k`` on every task's test split. One file per (reranker, task), reused when its
    fingerprint matches. Returns ``{"split", "retriever", "top_k", "ndcg_at_10": {"retriever" | "rerank-<name>":
    {task: v, "mean": m}}, "seconds_per_query": {...}, "fingerprint"}``."""
    from stm_ray.eval.evaluate import result_path
    from stm_ray.rerank.train import current_rerankers

    rerankers = current_rerankers(cfg) if rerankers is None else rerankers
    label, retriever = resolve_retriever(cfg)
    tasks = cfg.data.tasks
    table: dict[str, dict[str, float]] = {"retriever": {}}
    spq: dict[str, dict[str, float]] = {}
    fps = []
    for task in tasks:
        todo, outputs, records = {}, {}, {}
        for name, path in rerankers.items():
            fp = rerank_fingerprint(cfg, retriever, path, task)
            fps.append(fp.value)
            p = result_path(run_path(cfg.run_dir) / "eval" / f"rerank-{name}", task)
            prev = (read_record(p, kind="rerank evaluation result") or {}).get("stm_ray")
            outputs[name] = p
            if decide(fp, f"{name} on {task}", prev, complete=True, where=str(p)).action != "reuse":
                todo[name] = path
                records[name] = fp.record()
        if todo:
            rerank_task(cfg, retriever, todo, task, show_progress=show_progress, outputs=outputs, records=records)
        for name, p in outputs.items():
            doc = json.loads(p.read_text(encoding="utf-8"))
            table.setdefault(f"rerank-{name}", {})[task] = doc["scores"][cfg.data.test_split][0]["ndcg_at_10"]
            table["retriever"][task] = doc["stm_ray"]["retriever_scores"]["ndcg_at_10"]
            spq.setdefault(f"rerank-{name}", {})[task] = doc["stm_ray"]["seconds_per_query"]
    for row in table.values():
        if len(row) == len(tasks):
            row["mean"] = sum(row[t] for t in tasks) / len(tasks)
    for label_, row in table.items():
        if row:
            log.info("NDCG@10 %s: %s", label_, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return {"split": cfg.data.test_split, "retriever": label, "retriever_model": retriever, "top_k": cfg.rerank.top_k,
            "ndcg_at_10": table, "seconds_per_query": spq, "fingerprint": combine(fps)}
