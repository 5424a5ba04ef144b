"""The evaluate stage: embed a split, exact cosine search, trec_eval-style metrics, mteb-format results."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stm_ray.data import RetrievalSplit, RetrievalTask, load_task
from stm_ray.eval.metrics import evaluate_run
from stm_ray.eval.search import exact_search, to_run
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
                            "timings": self.timings, "mteb_cross_check": self.mteb_scores}}


def evaluate_split(embedder, split: RetrievalSplit, *, k_values=(1, 3, 5, 10, 100), top_k: int = 100,
                   corpus_chunk_size: int = 50_000, corpus_emb=None, show_progress: bool = False,
                   model_name: str = "") -> EvalResult:
    """Evaluate one split. ``corpus_emb`` reuses document embeddings already computed for this corpus."""
    t0 = time.perf_counter()
    if corpus_emb is None:
        corpus_emb = embedder.encode_corpus(split.corpus, show_progress=show_progress)
    t1 = time.perf_counter()
    q = embedder.encode_queries(split.queries, show_progress=show_progress)
    t2 = time.perf_counter()
    scores, idx = exact_search(q, corpus_emb, top_k=max(top_k, max(k_values)), corpus_chunk_size=corpus_chunk_size)
    means, per_query = evaluate_run(to_run(split.query_ids, split.corpus_ids, scores, idx), split.relevant, k_values)
    t3 = time.perf_counter()
    return EvalResult(model_name or embedder.name_or_path, split.task, split.split, means, len(split), len(split.corpus),
                      t3 - t0, {"encode_corpus_s": t1 - t0, "encode_queries_s": t2 - t1, "search_s": t3 - t2},
                      per_query)


def evaluate(model, task: str | RetrievalTask, split: str = "test", *, model_cfg=None, eval_cfg=None,
             strict: bool = False, max_queries: int | None = None, use_mteb: bool | None = None,
             output: str | Path | None = None, show_progress: bool = True) -> EvalResult:
    """Evaluate one task split. ``model`` is an Embedder, a folder, a hub id or an alias; ``task`` a spec or a
    task already loaded (so callers that need its tables too load it once)."""
    from stm_ray.config import EvalConfig, ModelConfig
    from stm_ray.modeling import Embedder

    eval_cfg = eval_cfg or EvalConfig()
    if not isinstance(model, Embedder):
        cfg = (model_cfg or ModelConfig()).model_copy(update={"name_or_path": str(model)})
        model = Embedder.from_config(cfg)
    t = load_task(task, strict=strict) if isinstance(task, str) else task
    spec = task if isinstance(task, str) else t.name
    sp = t.split(split, max_queries=max_queries)
    log.info("evaluating %s on %s/%s: %d queries, %d documents", model.name_or_path, spec, split, len(sp), len(sp.corpus))
    res = evaluate_split(model, sp, k_values=tuple(eval_cfg.k_values), top_k=eval_cfg.top_k,
                         corpus_chunk_size=eval_cfg.corpus_chunk_size, show_progress=show_progress,
                         model_name=model.name_or_path)
    res.task = spec
    if use_mteb if use_mteb is not None else eval_cfg.use_mteb:
        from stm_ray.eval.mteb_adapter import mteb_scores

        res.mteb_scores = mteb_scores(model, sp)
    if output:
        atomic_write_json(output, res.to_mteb_json())
    return res


def result_path(output: str | Path, task: str, n_tasks: int = 1) -> Path:
    """``output`` is a .json file for a single task, otherwise a folder holding ``<task>.json`` per task."""
    out = Path(output)
    if n_tasks > 1 or out.suffix != ".json":
        out = out / (task.replace(":", "_").replace("/", "_") + ".json")
    return out


def evaluate_tasks(cfg, *, model: str | None = None, tasks: list[str] | None = None, split: str | None = None,
                   output: str | Path | None = None, max_queries: int | None = None, use_mteb: bool | None = None,
                   strict: bool | None = None, show_progress: bool = True) -> list[EvalResult]:
    """The evaluate stage over a :class:`PipelineConfig`: one model (loaded once) on every configured task.

    Arguments left as None come from the config (``model.name_or_path``, ``data.tasks``, ``data.test_split``, ...).
    """
    from stm_ray.modeling import Embedder

    model_cfg = cfg.model if model is None else cfg.model.model_copy(update={"name_or_path": model})
    tasks = tasks or cfg.data.tasks
    emb = Embedder.from_config(model_cfg)
    results = []
    for task in tasks:
        out = result_path(output, task, len(tasks)) if output else None
        results.append(evaluate(emb, task, split or cfg.data.test_split, eval_cfg=cfg.eval,
                                strict=cfg.data.strict if strict is None else strict,
                                max_queries=max_queries or cfg.data.max_queries, use_mteb=use_mteb, output=out,
                                show_progress=show_progress))
        if out:
            log.info("wrote %s", out)
    return results


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


def format_table(rows: list[dict[str, Any]], columns: list[str], floatfmt: str = "{:.4f}") -> str:
    """A plain aligned text table (also valid markdown)."""
    cells = [[floatfmt.format(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join([line, sep, *body])
