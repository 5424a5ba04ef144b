"""Same-task (homogeneous) global batches, per-worker slices, negatives and instructions per query.

Every worker computes the same plan from (rows, seed, epoch), so the global batch sequence does not depend on the
number of workers: worker r takes slice r of each global batch. That is what makes a 2-worker run equal a
1-worker run on the same data (tests/test_train_ray.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from stm_ray.modeling.embedder import instruction_prefix

log = logging.getLogger(__name__)


def text_key(text: str) -> int:
    """A stable signed 64-bit hash of a text (for masking false negatives across workers)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def plan_batches(tasks: list[str], global_batch: int, num_workers: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each global batch of one epoch; every batch holds rows of one task only.

    A task's rows are shuffled and cut into ``global_batch`` chunks; its last, short chunk is completed with the
    task's first rows of this epoch (no row is lost and no batch has a row twice). A task smaller than the batch
    gives one batch of its rows, rounded down to a multiple of ``num_workers``. Batch order is shuffled.
    """
    if global_batch % num_workers:
        raise ValueError(f"train.batch_size ({global_batch}) must be a multiple of train.num_workers ({num_workers})")
    rng = np.random.default_rng([seed, epoch])
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    batches: list[np.ndarray] = []
    for task in sorted(by_task):
        idx = rng.permutation(np.asarray(by_task[task]))
        n = len(idx)
        if n < global_batch:
            m = n - n % num_workers
            if m == 0:
                log.warning("task %s: %d row(s), fewer than the %d workers; skipped", task, n, num_workers)
                continue
            batches.append(idx[:m])
            continue
        for start in range(0, n, global_batch):
            chunk = idx[start:start + global_batch]
            if len(chunk) < global_batch:
                chunk = np.concatenate([chunk, idx[:global_batch - len(chunk)]])
            batches.append(chunk)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def worker_slice(batch: np.ndarray, rank: int, num_workers: int) -> np.ndarray:
    per = len(batch) // num_workers
    return batch[rank * per:(rank + 1) * per]


@dataclass
class TrainRows:
    """Columns of an expert's training rows, as Python lists (cheap to ship to workers through the object store)."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    instructions: list[str]
    tasks: list[str]
    positive_scores: list[float | None] | None = None
    negative_scores: list[list[float] | None] | None = None

    @classmethod
    def from_table(cls, table, negative_sources: list[str] | None = None, scores: bool = False) -> TrainRows:
        """The rows of a shard table; ``scores``: keep the teacher columns (rows without them get None)."""
        negs = table.column("negatives").to_pylist()
        pos_s = table.column("positive_score").to_pylist() if scores and "positive_score" in table.column_names else None
        neg_s = table.column("negative_scores").to_pylist() if pos_s is not None else None
        if negative_sources is not None:
            allowed = set(negative_sources)
            srcs = table.column("negative_sources").to_pylist()
            keep = [[s in allowed for s in ss] for ss in srcs]
            negs = [[x for x, k in zip(ns or [], ks) if k] for ns, ks in zip(negs, keep)]
            if neg_s is not None:
                neg_s = [None if sc is None else [x for x, k in zip(sc, ks) if k] for sc, ks in zip(neg_s, keep)]
        return cls(queries=table.column("query").to_pylist(), positives=table.column("positive").to_pylist(),
                   negatives=[list(x or []) for x in negs], instructions=table.column("instruction").to_pylist(),
                   tasks=table.column("task").to_pylist(),
                   positive_scores=pos_s, negative_scores=neg_s)

    @property
    def scored(self) -> int:
        """Rows with teacher scores (the positive's and every negative's)."""
        if self.positive_scores is None:
            return 0
        return sum(p is not None and s is not None for p, s in zip(self.positive_scores, self.negative_scores))

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class WorkerBatch:
    """One worker's slice: query texts (instruction prefixed), doc texts (positives, then negative slots)."""

    queries: list[str]
    docs: list[str]
    doc_valid: torch.Tensor
    doc_keys: torch.Tensor
    n_neg: int
    teacher: torch.Tensor | None = None  # [B, 1 + n_neg]: the group's teacher scores (positive first), NaN = none


def build_batch(rows: TrainRows, idx: np.ndarray, *, n_neg: int, instruction_mode: str, fixed_instruction: str,
                pool: list[str], seed: int, step: int) -> WorkerBatch:
    """Texts and masks for the rows ``idx``.

    Negatives: up to ``n_neg`` per query, sampled without replacement from the row's list (deterministic in
    seed, step, row); missing slots are padding (masked in the loss, never encoded).
    Instructions: ``fixed`` prefixes every query with ``fixed_instruction``; ``row`` with the row's own
    instruction column; ``pool`` with one instruction sampled per query from ``pool`` (STM's generic prompts).
    Sentences become ``Instruct: ...\\nQuery: `` prefixes (:func:`instruction_prefix`).
    Teacher scores (rows that have them) follow their candidates into ``teacher``; a row without them gets NaN.
    """
    scored = rows.positive_scores is not None
    queries, positives, neg_slots, teacher = [], [], [], []
    for i in idx:
        i = int(i)
        rng = np.random.default_rng([seed, step, i])
        if instruction_mode == "pool" and pool:
            instr = instruction_prefix(pool[int(rng.integers(len(pool)))])
        elif instruction_mode == "row":
            instr = instruction_prefix(rows.instructions[i])
        else:
            instr = fixed_instruction
        queries.append(instr + rows.queries[i])
        positives.append(rows.positives[i])
        negs = rows.negatives[i]
        order = rng.permutation(len(negs))[:n_neg] if negs else []
        pick = [negs[j] for j in order]
        neg_slots.append(pick + [None] * (n_neg - len(pick)))
        if scored:
            p, ns = rows.positive_scores[i], rows.negative_scores[i]
            if p is None or ns is None:
                teacher.append([math.nan] * (1 + n_neg))
            else:
                teacher.append([p] + [ns[j] for j in order] + [math.nan] * (n_neg - len(pick)))
    flat = positives + [n for slots in neg_slots for n in slots]
    valid = torch.tensor([t is not None for t in flat], dtype=torch.bool)
    keys = torch.tensor([text_key(t) if t is not None else 0 for t in flat], dtype=torch.int64)
    return WorkerBatch(queries=queries, docs=[t for t in flat if t is not None], doc_valid=valid, doc_keys=keys,
                       n_neg=n_neg, teacher=torch.tensor(teacher, dtype=torch.float32).reshape(len(idx), 1 + n_neg)
                       if scored else None)
