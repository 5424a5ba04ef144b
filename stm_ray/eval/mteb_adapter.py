"""mteb adapter: our Embedder as an mteb ``AbsEncoder`` and our tasks as local ``AbsTaskRetrieval`` tasks.

``mteb.evaluate(MtebEncoder(embedder), tasks=[local_retrieval_task(split)])`` runs mteb's own retrieval pipeline
(its search and pytrec_eval metrics) over our data, offline: the cross-check of our evaluator.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import numpy as np

from stm_ray.data.task import RetrievalSplit


@cache
def _encoder_class():
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType

    class MtebEncoder(AbsEncoder):
        """Wraps an :class:`stm_ray.modeling.Embedder`; mteb's ``prompt_type`` picks query or document encoding."""

        def __init__(self, embedder, name: str = "stm-ray/embedder") -> None:
            from mteb.models.model_meta import ModelMeta

            self.model = embedder
            self.mteb_model_meta = ModelMeta(
                loader=None, name=name, revision="local", release_date=None, languages=None, n_parameters=None,
                memory_usage_mb=None, max_tokens=embedder.max_length, embed_dim=embedder.dim, license=None,
                open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
                reference=None, similarity_fn_name="cosine", use_instructions=bool(embedder.query_instruction),
                training_datasets=None)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
            texts = [t for batch in inputs for t in batch["text"]]
            if prompt_type == PromptType.query:
                return self.model.encode_queries(texts)
            return self.model.encode_corpus(texts)

    return MtebEncoder


def MtebEncoder(embedder, name: str = "stm-ray/embedder"):  # noqa: N802 - reads as a class
    return _encoder_class()(embedder, name)


def local_retrieval_task(split: RetrievalSplit):
    """An mteb retrieval task over one of our splits (documents as already-joined text; no download)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    name = "Stm" + re.sub(r"[^A-Za-z0-9]+", "", split.task.title()) or "StmTask"
    meta = TaskMetadata(
        name=name, description=f"stm-ray local retrieval task {split.task} ({split.split} split)",
        reference=None, dataset={"path": f"local/{name}", "revision": "local"}, type="Retrieval", category="t2t",
        modalities=["text"], eval_splits=[split.split], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation=None)

    data = RetrievalSplitData(
        corpus=Dataset.from_dict({"id": split.corpus_ids, "text": split.corpus}),
        queries=Dataset.from_dict({"id": split.query_ids, "text": split.queries}),
        relevant_docs={q: dict(d) for q, d in split.relevant.items()}, top_ranked=None)

    class LocalRetrievalTask(AbsTaskRetrieval):
        metadata = meta

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {split.split: data}}
            self.data_loaded = True

    LocalRetrievalTask.__name__ = name
    return LocalRetrievalTask()


def mteb_scores(embedder, split: RetrievalSplit) -> dict[str, float]:
    """Run mteb.evaluate on our split; returns mteb's score dict for it (ndcg_at_10, recall_at_10, ...)."""
    import mteb

    task = local_retrieval_task(split)
    res = mteb.evaluate(MtebEncoder(embedder), tasks=[task], cache=None, show_progress_bar=False)
    tr = res.task_results[0]
    scores = tr.scores[split.split][0]
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
