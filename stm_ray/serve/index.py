"""A corpus index for ``/search``: document embeddings computed once, saved in a folder, searched exactly or by faiss.

The folder (``<run_dir>/index/<task>/`` by default) holds ``embeddings.npy`` (float32, L2-normalised),
``docs.parquet`` (id, text) and ``meta.json`` (fingerprint, task, size). It is written atomically and follows the
stage contract (:mod:`stm_ray.stage`): an index whose fingerprint (model files, task data, load settings) matches
is reused, checked without loading the model, so replicas start in seconds and a restarted replica never
re-encodes the corpus; any other is rebuilt.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from stm_ray.records import read_record
from stm_ray.stage import Fingerprint, decide, fingerprint

log = logging.getLogger(__name__)

META = "meta.json"


def index_fingerprint(model: str, task_spec: str, *, max_length: int | None = None,
                      dtype: str = "float32") -> Fingerprint:
    """The index's fingerprint (the stage contract): the model (by its files), the task's data and the load
    settings that change the vectors. Checked without loading the model."""
    from stm_ray.config import ModelConfig, PipelineConfig
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    cfg = PipelineConfig(model=ModelConfig(name_or_path=model, max_length=max_length, dtype=dtype))
    return fingerprint("index", cfg, {"model": model_fingerprint(model), "task": task_spec,
                                      "data": task_fingerprint(task_spec)})


def task_slug(spec: str) -> str:
    """A folder name for a task spec: ``beir:/data/scifact`` -> ``beir-scifact``, ``icd10:1,2`` -> ``icd10-1-2``."""
    kind, _, arg = spec.partition(":")
    if kind == "beir" and arg:
        arg = Path(arg.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}-{arg}" if arg else kind).strip("-")


class CorpusIndex:
    """Document ids, texts and embeddings, with top-k search by cosine similarity."""

    def __init__(self, ids: list[str], texts: list[str], embeddings: np.ndarray, *, backend: str = "exact",
                 faiss_factory: str = "Flat", meta: dict | None = None) -> None:
        if len(ids) != len(texts) or len(ids) != embeddings.shape[0]:
            raise ValueError(f"index sizes differ: {len(ids)} ids, {len(texts)} texts, {embeddings.shape[0]} vectors")
        self.ids = ids
        self.texts = texts
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.meta = meta or {}
        self.backend = backend
        self._faiss = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("serve.search_backend=faiss needs faiss: pip install faiss-cpu") from e
            index = faiss.index_factory(self.dim, faiss_factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(self.embeddings)
            index.add(self.embeddings)
            self._faiss = index
        elif backend != "exact":
            raise ValueError(f"unknown search backend {backend!r} (exact or faiss)")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [n, k], indices [n, k]) best first; queries are L2-normalised here."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = min(int(top_k), len(self))
        if self._faiss is not None:
            scores, idx = self._faiss.search(q, k)
            return scores, idx
        sims = q @ self.embeddings.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(q), 1))
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        return np.take_along_axis(part_scores, order, axis=1), np.take_along_axis(part, order, axis=1)

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from stm_ray.utils import atomic_dir

        with atomic_dir(folder) as tmp:
            np.save(tmp / "embeddings.npy", self.embeddings)
            pq.write_table(pa.table({"id": self.ids, "text": self.texts}), tmp / "docs.parquet")
            (tmp / META).write_text(json.dumps({**self.meta, "num_documents": len(self), "dim": self.dim}, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, *, backend: str = "exact", faiss_factory: str = "Flat",
             dimension: int | None = None) -> CorpusIndex:
        """The index saved in ``folder``; ``dimension`` keeps the first coordinates of each embedding
        (renormalised; queries must then be cut the same way)."""
        import pyarrow.parquet as pq

        from stm_ray.modeling.embedder import truncate

        folder = Path(folder)
        if not (folder / META).is_file():
            raise FileNotFoundError(f"no corpus index in {folder} (missing {META}); build it with "
                                    f"`stm-ray serve MODEL --corpus TASK`")
        meta = json.loads((folder / META).read_text())
        docs = pq.read_table(folder / "docs.parquet")
        emb = np.load(folder / "embeddings.npy", mmap_mode=None)
        if dimension is not None and dimension > emb.shape[1]:
            raise ValueError(f"serve.index_dimension={dimension} is above the index's {emb.shape[1]} dimensions")
        emb = truncate(emb, dimension)
        return cls([str(x) for x in docs.column("id").to_pylist()], docs.column("text").to_pylist(), emb,
                   backend=backend, faiss_factory=faiss_factory, meta=meta)


def read_meta(folder: str | Path) -> dict | None:
    return read_record(Path(folder) / META, kind="corpus index meta")


def current_meta(folder: str | Path, model: str, task_spec: str, *, max_length: int | None = None,
                 dtype: str = "float32") -> dict | None:
    """The meta of the index in ``folder`` when its fingerprint is the one ``model`` (with these settings) and
    ``task_spec`` give now (the stage contract's reuse), else None (after logging why: run or redo)."""
    meta = read_meta(folder)
    fp = index_fingerprint(model, task_spec, max_length=max_length, dtype=dtype)
    return meta if decide(fp, task_spec, meta, complete=True, where=str(folder)).action == "reuse" else None


def build_index(model: str, task_spec: str, folder: str | Path, *, max_length: int | None = None,
                dtype: str = "float32", device: str = "auto", batch_size: int = 64, strict: bool = False,
                show_progress: bool = True) -> dict:
    """Encode a task's corpus with ``model`` into ``folder`` unless the index there has the same fingerprint.

    Returns the index's meta (``reused`` tells whether it was already built)."""
    from stm_ray.data import load_task
    from stm_ray.modeling import Embedder

    folder = Path(folder)
    meta = current_meta(folder, model, task_spec, max_length=max_length, dtype=dtype)
    if meta is not None:
        return {**meta, "reused": True}
    emb = Embedder.from_pretrained(model, max_length=max_length, dtype=dtype, device=device, batch_size=batch_size)
    task = load_task(task_spec, strict=strict)
    ids = [str(x) for x in task.corpus.column("_id").to_pylist()]
    texts = task.doc_texts()
    t0 = time.perf_counter()
    log.info("indexing %d documents of %s with %s", len(ids), task_spec, model)
    vectors = emb.encode_corpus(texts, show_progress=show_progress, desc="index")
    fp = index_fingerprint(model, task_spec, max_length=max_length, dtype=dtype)
    meta = {"model": model, **fp.record(), "task": task_spec, "dim": int(vectors.shape[1]), "normalized": True, "encode_seconds": round(time.perf_counter() - t0, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    CorpusIndex(ids, texts, vectors, meta=meta).save(folder)
    log.info("corpus index written to %s (%d documents, %.0f s)", folder, len(ids), meta["encode_seconds"])
    return {**meta, "num_documents": len(ids), "reused": False}
