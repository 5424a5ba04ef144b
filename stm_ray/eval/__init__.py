"""Evaluation: exact search, trec_eval-style metrics, the mteb adapter, tables."""

from stm_ray.eval.evaluate import (
    EvalResult,
    evaluate,
    evaluate_models,
    evaluate_split,
    evaluate_tasks,
    evaluation_fingerprint,
    results_table,
)
from stm_ray.eval.metrics import evaluate_run
from stm_ray.eval.search import exact_search

__all__ = ["EvalResult", "evaluate", "evaluate_models", "evaluate_run", "evaluate_split", "evaluate_tasks",
           "evaluation_fingerprint", "exact_search", "results_table"]
