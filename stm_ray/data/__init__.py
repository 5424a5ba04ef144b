"""Retrieval data: BEIR folders, the embedded ICD-10-CM task and mteb tasks as Arrow tables."""

from stm_ray.data.registry import TASKS, load_task, task_fingerprint
from stm_ray.data.task import DataError, DataProblem, DataReport, RetrievalSplit, RetrievalTask, doc_text

__all__ = ["TASKS", "DataError", "DataProblem", "DataReport", "RetrievalSplit", "RetrievalTask", "doc_text", "load_task",
           "task_fingerprint"]
