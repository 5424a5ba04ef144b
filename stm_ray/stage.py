"""The stage contract: one fingerprint rule and one reuse rule for every stage's outputs.

Every output a stage writes (the synthesis shards, an expert, the instruction search, the merged model, an
evaluation file, a serving index) records the fingerprint of what produced it, computed by :func:`fingerprint`:

* the config values the stage reads (:data:`READS`), without the fields the config models mark as not changing
  outputs (``RUNTIME``: resources, concurrency, progress, locations) or as inputs (``INPUT``: counted through their
  own fingerprint);
* the fingerprints of its inputs: task data (:func:`stm_ray.data.task_fingerprint`), model folders
  (:func:`stm_ray.modeling.model_fingerprint`), upstream outputs.

A rerun asks :func:`decide` about each output: ``run`` (nothing there), ``reuse`` (finished, same fingerprint),
``resume`` (unfinished, same fingerprint), ``redo`` (another fingerprint, or ``--force``). The decision is logged
with the config values that changed, and collected by :func:`recording` for the pipeline's manifest. No stage
decides any other way.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel

from stm_ray.config import output_values

log = logging.getLogger("stm_ray.stage")

# What each stage reads of the pipeline config: a section, or one field of it.
READS: dict[str, tuple[str, ...]] = {
    "synthesize": ("data.tasks", "data.train_split", "data.dev_split", "data.max_queries", "data.seed", "model",
                   "synth"),
    "query-generations": ("queries.per_document", "queries.kinds", "queries.prompts", "queries.examples",
                          "queries.max_documents", "queries.min_document_words", "queries.max_new_tokens",
                          "queries.passage_words", "queries.passage_overlap", "queries.shard_size", "queries.seed",
                          "synth.generator", "synth.engine", "synth.temperature", "synth.top_p",
                          "synth.prompt_max_chars", "synth.seed"),
    "queries": ("queries", "model"),
    "teacher": ("teacher", "synth.generator", "synth.max_model_len"),
    "train": ("model", "train"),
    "instructions": ("data.tasks", "data.dev_split", "model", "search.instructions", "search.use_synth_pool",
                     "search.num_samples", "search.searcher", "search.dev_max_queries", "search.dev_corpus_size",
                     "search.dev_pool_depth", "search.seed"),
    "instruction-pools": ("data.tasks", "data.dev_split", "model", "train", "search.pool_sizes",
                          "search.dev_max_queries", "search.dev_corpus_size", "search.dev_pool_depth", "search.seed"),
    "merge": ("data.tasks", "data.dev_split", "model", "merge", "search.dev_max_queries", "search.dev_corpus_size",
              "search.dev_pool_depth", "search.seed"),
    "evaluate": ("data.test_split", "data.max_queries", "model", "eval"),
    "index": ("model.dtype", "model.max_length"),
    "rerankers": ("rerank.loss", "rerank.negatives_per_query", "rerank.instruction", "rerank.batch_size",
                  "rerank.epochs", "rerank.max_steps", "rerank.max_rows", "rerank.warmup_ratio",
                  "rerank.weight_decay", "rerank.max_grad_norm", "rerank.seed", "rerank.use_gpu", "rerank.strategy",
                  "rerank.zero_stage", "rerank.deepspeed"),
    "rerank": ("data.test_split", "data.max_queries", "model", "eval.k_values", "rerank.top_k",
               "rerank.max_queries"),
}
ACTIONS = ("run", "reuse", "resume", "redo")


def _read(cfg: BaseModel, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, BaseModel):
        return output_values(value)
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class Fingerprint:
    """A stage output's fingerprint (``value``) and what it was computed from (``material``: config values and
    input fingerprints), recorded next to the output so that a later mismatch can say what changed."""

    stage: str
    value: str
    material: dict[str, Any]

    def __str__(self) -> str:
        return self.value

    def record(self) -> dict[str, Any]:
        return {"fingerprint": self.value, "fingerprint_material": self.material}


def fingerprint(stage: str, cfg: BaseModel, inputs: dict[str, Any] | None = None) -> Fingerprint:
    """The fingerprint of ``stage``'s output under ``cfg`` (a PipelineConfig) from ``inputs`` (plain values:
    fingerprints of upstream outputs, model folders and task data, names)."""
    if stage not in READS:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(READS)}")
    material = {"stage": stage, "config": {p: _read(cfg, p) for p in READS[stage]},
                "inputs": json.loads(json.dumps(inputs or {}, sort_keys=True, default=str))}
    value = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return Fingerprint(stage, value, material)


def changes(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 6) -> list[str]:
    """What differs between two fingerprint materials, as ``path: old -> new`` lines."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else str(k))
        elif a != b:
            out.append(f"{path.removeprefix('config.')}: {json.dumps(a, default=str)[:60]} -> "
                       f"{json.dumps(b, default=str)[:60]}")

    if old is None:
        return ["(no record of what produced it)"]
    walk(old, new, "")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


@dataclass
class Decision:
    """What a stage does with one of its outputs, and why."""

    stage: str
    item: str
    action: str
    fingerprint: str
    previous: str | None = None
    changed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("stm_ray_force", default=False)
_RECORDER: contextvars.ContextVar[list[Decision] | None] = contextvars.ContextVar("stm_ray_recorder", default=None)


@contextmanager
def forcing(force: bool = True) -> Iterator[None]:
    """Within this block every existing output is redone, whatever its fingerprint (``--force``)."""
    token = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(token)


@contextmanager
def recording() -> Iterator[list[Decision]]:
    """Collect the decisions stages make within this block (the pipeline stores them in its manifest)."""
    decisions: list[Decision] = []
    token = _RECORDER.set(decisions)
    try:
        yield decisions
    finally:
        _RECORDER.reset(token)


def decide(fp: Fingerprint, item: str, record: dict[str, Any] | None, *, complete: bool = True,
           where: str = "") -> Decision:
    """The one reuse rule. ``record`` is what the existing output recorded (``Fingerprint.record()``), None when
    there is none (:func:`stm_ray.records.read_record`: also when its file is corrupt or foreign); ``complete`` says
    whether that output is finished."""
    previous = (record or {}).get("fingerprint")
    if record is None:
        action = "run"
    elif previous != fp.value:
        action = "redo"
    elif _FORCE.get():
        action = "redo"
    else:
        action = "reuse" if complete else "resume"
    changed = []
    if action == "redo" and previous != fp.value:
        changed = changes((record or {}).get("fingerprint_material"), fp.material)
    d = Decision(fp.stage, item, action, fp.value, previous, changed)
    at = f" ({where})" if where else ""
    if action == "reuse":
        log.info("%s %s: reuse, fingerprint %s matches%s", fp.stage, item, fp.value, at)
    elif action == "resume":
        log.info("%s %s: resume, unfinished output with fingerprint %s%s", fp.stage, item, fp.value, at)
    elif action == "redo":
        why = "--force" if previous == fp.value else f"fingerprint {previous} -> {fp.value}; " + "; ".join(changed)
        log.info("%s %s: redo (%s)%s", fp.stage, item, why, at)
    else:
        log.info("%s %s: run, fingerprint %s%s", fp.stage, item, fp.value, at)
    rec = _RECORDER.get()
    if rec is not None:
        rec.append(d)
    return d


def summarize(decisions: list[Decision]) -> str:
    """One word for a stage from its items' decisions: reused, ran, resumed, redone, or mixed (e.g. 'reused 1,
    redone 1')."""
    if not decisions:
        return "ran"
    counts = {a: sum(d.action == a for d in decisions) for a in ACTIONS}
    words = {"run": "ran", "reuse": "reused", "resume": "resumed", "redo": "redone"}
    present = [a for a in ACTIONS if counts[a]]
    if len(present) == 1:
        return words[present[0]]
    return ", ".join(f"{words[a]} {counts[a]}" for a in present)


def combine(values: list[str]) -> str:
    """One fingerprint for a stage made of several outputs (e.g. one per expert)."""
    return hashlib.sha256("|".join(values).encode()).hexdigest()[:16]
