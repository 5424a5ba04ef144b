"""The evaluate stage: embed a split, exact cosine search, trec_eval-style metrics, mteb-format results."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stm_ray.data import RetrievalSplit, RetrievalTask, load_task
from stm_ray.eval.metrics import evaluate_run
from stm_ray.eval.search import exact_search, to_run
from stm_ray.records import read_record
from stm_ray.stage import Fingerprint, decide, fingerprint
from stm_ray.storage import run_path
from stm_ray.tables import format_table
from stm_ray.utils import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores of one model on one task split; ``to_mteb_json`` gives mteb's TaskResult layout."""

    model: str
    task: str
    split: str
    scores: dict[str, float]
    num_queries: int
    num_documents: int
    evaluation_time: float
    timings: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    mteb_scores: dict[str, float] | None = None
    by_dimension: dict[int, dict[str, float]] = field(default_factory=dict)  # Matryoshka: scores per truncation

    @property
    def ndcg_at_10(self) -> float:
        return self.scores["ndcg_at_10"]

    def to_mteb_json(self) -> dict[str, Any]:
        import mteb

        entry = {"hf_subset": "default", "languages": ["eng-Latn"], "main_score": self.scores["ndcg_at_10"]}
        entry.update(self.scores)
        return {"dataset_revision": "local", "task_name": self.task, "mteb_version": mteb.__version__,
                "scores": {self.split: [entry]}, "evaluation_time": self.evaluation_time, "kg_co2_emissions": None,
                "stm_ray": {"model": self.model, "num_queries": self.num_queries, "num_documents": self.num_documents,
                            "timings": self.timings, "mteb_cross_check": self.mteb_scores,
                            **({"by_dimension": {str(k): v for k, v in self.by_dimension.items()}}
                               if self.by_dimension else {})}}


def evaluate_split(embedder, split: RetrievalSplit, *, k_values=(1, 3, 5, 10, 100), top_k: int = 100,
                   corpus_chunk_size: int = 50_000, corpus_emb=None, show_progress: bool = False,
                   model_name: str = "", dimension: int | None = None,
                   dimensions: Sequence[int] = ()) -> EvalResult:
    """Evaluate one split. ``corpus_emb`` reuses document embeddings already computed for this corpus.

    ``dimension`` scores the embeddings cut to their first ``dimension`` coordinates (Matryoshka truncation,
    renormalised); ``dimensions`` adds NDCG@10 and Recall@10 at each of those cuts from the same encode
    (``by_dimension``; cuts at or above the embedding size are the full embedding and skipped).
    """
    from stm_ray.modeling.embedder import truncate

    t0 = time.perf_counter()
    if corpus_emb is None:
        corpus_emb = embedder.encode_corpus(split.corpus, show_progress=show_progress)
    t1 = time.perf_counter()
    q = embedder.encode_queries(split.queries, show_progress=show_progress)
    t2 = time.perf_counter()
    norm = getattr(embedder, "normalize", True)
    full = q.shape[-1]
    q, corpus_emb = truncate(q, dimension, norm), truncate(corpus_emb, dimension, norm)
    scores, idx = exact_search(q, corpus_emb, top_k=max(top_k, max(k_values)), corpus_chunk_size=corpus_chunk_size)
    means, per_query = evaluate_run(to_run(split.query_ids, split.corpus_ids, scores, idx), split.relevant, k_values)
    by_dim: dict[int, dict[str, float]] = {}
    for dim in sorted(set(dimensions), reverse=True):
        if dim >= min(full, q.shape[-1]):
            continue
        s, i = exact_search(truncate(q, dim, norm), truncate(corpus_emb, dim, norm), top_k=10,
                            corpus_chunk_size=corpus_chunk_size)
        m, _ = evaluate_run(to_run(split.query_ids, split.corpus_ids, s, i), split.relevant, (10,))
        by_dim[dim] = {"ndcg_at_10": m["ndcg_at_10"], "recall_at_10": m["recall_at_10"]}
    t3 = time.perf_counter()
    return EvalResult(model_name or embedder.name_or_path, split.task, split.split, means, len(split), len(split.corpus),
                      t3 - t0, {"encode_corpus_s": t1 - t0, "encode_queries_s": t2 - t1, "search_s": t3 - t2},
                      per_query, by_dimension=by_dim)


def evaluate(model, task: str | RetrievalTask, split: str = "test", *, model_cfg=None, eval_cfg=None,
             strict: bool = False, max_queries: int | None = None, use_mteb: bool | None = None,
             output: str | Path | None = None, show_progress: bool = True,
             record: dict[str, Any] | None = None, corpus_emb=None, name: str | None = None) -> EvalResult:
    """Evaluate one task split. ``model`` is an Embedder, a folder, a hub id or an alias; ``task`` a spec or a
    task already loaded (so callers that need its tables too load it once). ``record`` (a fingerprint record) goes
    into the output file's ``stm_ray`` section; ``corpus_emb`` reuses this model's embeddings of the corpus; ``name``
    names the task in the results (default: the spec, or a loaded task's own name)."""
    from stm_ray.config import EvalConfig, ModelConfig
    from stm_ray.modeling import Embedder

    eval_cfg = eval_cfg or EvalConfig()
    if not isinstance(model, Embedder):
        cfg = (model_cfg or ModelConfig()).model_copy(update={"name_or_path": str(model)})
        model = Embedder.from_config(cfg)
    t = load_task(task, strict=strict) if isinstance(task, str) else task
    spec = name or (task if isinstance(task, str) else t.name)
    sp = t.split(split, max_queries=max_queries)
    log.info("evaluating %s on %s/%s: %d queries, %d documents", model.name_or_path, spec, split, len(sp), len(sp.corpus))
    res = evaluate_split(model, sp, k_values=tuple(eval_cfg.k_values), top_k=eval_cfg.top_k,
                         corpus_chunk_size=eval_cfg.corpus_chunk_size, show_progress=show_progress,
                         model_name=model.name_or_path, dimensions=eval_cfg.dimensions or (), corpus_emb=corpus_emb)
    res.task = spec
    if use_mteb if use_mteb is not None else eval_cfg.use_mteb:
        from stm_ray.eval.mteb_adapter import mteb_scores

        res.mteb_scores = mteb_scores(model, sp)
    if output:
        doc = res.to_mteb_json()
        doc["stm_ray"].update(record or {})
        atomic_write_json(output, doc)
    return res


def result_path(output: str | Path, task: str, n_tasks: int = 1) -> Path:
    """``output`` is a .json file for a single task, otherwise a folder holding ``<task>.json`` per task."""
    out = Path(output)
    if n_tasks > 1 or out.suffix != ".json":
        out = out / (task.replace(":", "_").replace("/", "_") + ".json")
    return out


def evaluate_tasks(cfg, *, model: str | None = None, tasks: list[str] | None = None, split: str | None = None,
                   output: str | Path | None = None, max_queries: int | None = None, use_mteb: bool | None = None,
                   strict: bool | None = None, show_progress: bool = True,
                   records: dict[str, dict[str, Any]] | None = None) -> list[EvalResult]:
    """The evaluate stage over a :class:`PipelineConfig`: one model (loaded once) on every configured task.

    Arguments left as None come from the config (``model.name_or_path``, ``data.tasks``, ``data.test_split``, ...).
    """
    from stm_ray.modeling import Embedder
    from stm_ray.synth.negatives import cached_corpus_embeddings

    model_cfg = cfg.model if model is None else cfg.model.model_copy(update={"name_or_path": model})
    tasks = tasks or cfg.data.tasks
    emb = Embedder.from_config(model_cfg)
    results = []
    for task in tasks:
        out = result_path(output, task, len(tasks)) if output else None
        strict_ = cfg.data.strict if strict is None else strict
        # a docs: task is the one the run's queries stage wrote (named by its spec)
        loaded = load_task(task, strict=strict_, run_dir=cfg.run_dir)
        # the base model's corpus embeddings: mining (or the queries stage's round trip) cached them already
        cached = cached_corpus_embeddings(cfg, task, model_cfg, loaded)
        if cached is not None:
            log.info("%s on %s: the corpus embeddings mining cached are reused", model_cfg.name_or_path, task)
        results.append(evaluate(emb, loaded, split or cfg.data.test_split, eval_cfg=cfg.eval, strict=strict_,
                                max_queries=max_queries or cfg.data.max_queries, use_mteb=use_mteb, output=out,
                                show_progress=show_progress, record=(records or {}).get(task), corpus_emb=cached,
                                name=task))
        if out:
            log.info("wrote %s", out)
    return results


def evaluation_fingerprint(cfg, model: str, task: str) -> Fingerprint:
    """An evaluation file's fingerprint (the stage contract): what evaluation reads of the config, the model (by
    :func:`~stm_ray.modeling.model_fingerprint`) and the task's data."""
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    return fingerprint("evaluate", cfg, {"model": model_fingerprint(model), "task": task,
                                         "data": task_fingerprint(task, cfg.run_dir)})


def evaluate_models(cfg, models: dict[str, str], *, show_progress: bool = True) -> dict[str, Any]:
    """The evaluate stage of the loop: every model of ``models`` ({label: model}) on every task of ``data.tasks``
    (test split), one mteb-format file each under ``<run_dir>/eval/<label>/<task>.json``. Each file is reused when
    its fingerprint matches and redone otherwise. Returns ``{"split", "ndcg_at_10": {label: {task: v, "mean": m}},
    "fingerprint"}``."""
    from stm_ray.stage import combine

    table: dict[str, dict[str, float]] = {}
    by_dim: dict[str, dict[str, dict[str, float]]] = {}
    fps = []
    for label, model in models.items():
        out = run_path(cfg.run_dir) / "eval" / label  # a folder: <task>.json per task
        paths = {t: result_path(out, t) for t in cfg.data.tasks}
        records, todo = {}, []
        for t, p in paths.items():
            fp = evaluation_fingerprint(cfg, model, t)
            fps.append(fp.value)
            prev = (read_record(p, kind="evaluation result") or {}).get("stm_ray")
            if decide(fp, f"{label} on {t}", prev, complete=True, where=str(p)).action != "reuse":
                todo.append(t)
                records[t] = fp.record()
        if todo:
            log.info("evaluate %s (%s) on %s/%s", label, model, ",".join(todo), cfg.data.test_split)
            evaluate_tasks(cfg, model=model, tasks=todo, output=out, show_progress=show_progress, records=records)
        table[label] = {}
        dims: dict[str, dict[str, float]] = {}
        for t, p in paths.items():
            res = json.loads(p.read_text(encoding="utf-8"))
            table[label][t] = res["scores"][cfg.data.test_split][0]["ndcg_at_10"]
            for dim, sc in (res.get("stm_ray", {}).get("by_dimension") or {}).items():
                dims.setdefault(dim, {})[t] = sc["ndcg_at_10"]
        table[label]["mean"] = sum(table[label][t] for t in cfg.data.tasks) / len(cfg.data.tasks)
        log.info("NDCG@10 %s: %s", label, ", ".join(f"{k} {v:.4f}" for k, v in table[label].items()))
        for dim, row in dims.items():
            if len(row) == len(cfg.data.tasks):
                row["mean"] = sum(row.values()) / len(row)
                by_dim.setdefault(label, {})[dim] = row
    out: dict[str, Any] = {"split": cfg.data.test_split, "ndcg_at_10": table, "fingerprint": combine(fps)}
    if by_dim:
        out["ndcg_at_10_by_dimension"] = by_dim  # {label: {dimension: {task: v, "mean": m}}}
    return out


def results_table(results: list[EvalResult]) -> str:
    """One row per task: queries, documents, NDCG@10, Recall@10/100, MRR@10 (and mteb's NDCG@10 when checked)."""
    rows = []
    for r in results:
        row = {"task": r.task, "split": r.split, "queries": r.num_queries, "docs": r.num_documents,
               "NDCG@10": r.scores["ndcg_at_10"], "Recall@10": r.scores.get("recall_at_10", float("nan")),
               "Recall@100": r.scores.get("recall_at_100", float("nan")), "MRR@10": r.scores.get("mrr_at_10", float("nan"))}
        if r.mteb_scores is not None:
            row["mteb NDCG@10"] = r.mteb_scores["ndcg_at_10"]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return format_table(rows, columns)
