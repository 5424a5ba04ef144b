"""Encode a table of texts with Ray Data: a pool of Embedder actors over ``map_batches``.

Used for corpora too large for one process (dense mining, evaluation on a cluster). Rows keep their ``_id``; the
result is reordered to the input order, so it equals :meth:`Embedder.encode` on the same texts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


class EmbedBatch:
    """Stateful Ray Data UDF: loads the model once per actor, embeds the ``text`` column of each batch."""

    def __init__(self, model_kwargs: dict[str, Any], prompt: str = "", threads: int = 1) -> None:
        import torch

        from stm_ray.modeling import Embedder

        torch.set_num_threads(max(1, threads))  # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs reserved
        self.embedder = Embedder.from_pretrained(**model_kwargs)
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.embedder.encode(list(batch["text"]), prompt=self.prompt)
        return {"_id": batch["_id"], "embedding": emb}


def _pool(concurrency: int | tuple[int, int]):
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency)
    return ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])


def ray_encode(table: pa.Table, model_kwargs: dict[str, Any], *, prompt: str = "", batch_size: int = 256,
               concurrency: int | tuple[int, int] = 1, num_cpus: float = 1.0) -> np.ndarray:
    """Embed ``table['text']`` (with ``_id``) on the running Ray cluster; returns [n, dim] in table order."""
    import ray.data

    for col in ("_id", "text"):
        if col not in table.column_names:
            raise ValueError(f"ray_encode needs a '{col}' column; the table has {table.column_names}")
    ds = ray.data.from_arrow(table.select(["_id", "text"]))
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model_kwargs": model_kwargs, "prompt": prompt,
                                                            "threads": int(num_cpus)},
                         batch_size=batch_size, batch_format="numpy", compute=_pool(concurrency), num_cpus=num_cpus)
    ids: list[str] = []
    embs: list[np.ndarray] = []
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        ids.extend(batch["_id"].tolist())
        embs.append(np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"])
    pos = {i: n for n, i in enumerate(ids)}
    matrix = np.concatenate(embs).astype(np.float32)
    return matrix[[pos[i] for i in table.column("_id").to_pylist()]]
