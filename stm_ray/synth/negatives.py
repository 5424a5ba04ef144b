"""Synthesize: every (query, positive) pair of the train split -> hard negatives -> parquet shards.

Ray Data does the work in two executions:

1. **Mining** (:class:`~stm_ray.synth.mine.MineBatch` actors): BM25 and dense negatives with the positive-aware
   false-negative filter. Materialised in the object store, so the mining actors give their CPUs back before the
   engine starts.
2. **Generation** (``ray.data.llm``: vLLM engine actors, or an OpenAI-compatible endpoint): one STM prompt per
   (pair, synthetic index) and the instruction-pool prompts, streamed through an autoscaling actor pool; every
   generated negative is checked (:mod:`stm_ray.synth.checks`) in the post-processing stage.

The driver collects rows as they stream back and writes a shard as soon as all of its rows are in. Layout::

    <run_dir>/synth/
      manifest.json                 config fingerprint, totals, timings (rewritten atomically after each run)
      <task>/part-00000.parquet     shard rows (schema: stm_ray.data.shards); stats in the parquet metadata
      instructions/<task>.json      {"task", "description", "instructions": [...]}: train.instruction_pool reads it
      cache/                        dense corpus embeddings per (task, model)

Which pair goes to which shard depends only on the data and the config, and shards are written atomically, so a
rerun writes exactly the shards that are missing: a run killed mid-way loses no row and duplicates none.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stm_ray.config import ConfigError, PipelineConfig
from stm_ray.data import DataError, load_task
from stm_ray.data.instructions import task_instruction
from stm_ray.data.shards import NEGATIVE_SOURCES, shard_files, shard_stats, write_shard
from stm_ray.data.task import RetrievalTask, stable_fraction
from stm_ray.records import StageRecord, read_record
from stm_ray.stage import Decision, Fingerprint, fingerprint
from stm_ray.storage import run_path
from stm_ray.synth.autoscale import ActorPoolSampler
from stm_ray.synth.checks import DROP_REASONS, check_negative
from stm_ray.synth.mine import MineBatch
from stm_ray.synth.prompts import clean_instruction

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ROW_FIELDS = ("kind", "key", "gen", "shard", "task", "expert", "query_id", "query", "positive_id", "positive",
              "instruction", "judged_ids", "description", "examples", "llm")


def safe_name(text: str) -> str:
    """A task spec or tag as a file/folder name (``beir:/data/scifact`` -> ``beir-scifact``, ``docs:/data/notes``
    -> ``docs-notes``)."""
    if text.startswith("docs:"):
        from stm_ray.data.docs import folder_name

        return folder_name(text)
    if text.startswith("beir:"):
        text = "beir-" + Path(text[5:].rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "task"


@dataclass
class SynthResult:
    """What a synthesis run wrote (totals over every shard in the folder, this run's and earlier ones)."""

    out_dir: Path
    rows: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    negatives_by_source: dict[str, int] = field(default_factory=dict)
    drops_by_reason: dict[str, int] = field(default_factory=dict)
    synthetic_generated: int = 0
    false_negatives_dropped: int = 0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    seconds: float = 0.0
    instruction_files: dict[str, str] = field(default_factory=dict)
    actor_pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprint: str = ""
    reused: bool = False
    duplicates_dropped: int = 0  # rows delivered twice by redone work (a lost node), written once

    @property
    def tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "shards": self.shards, "shards_written": self.shards_written,
                "shards_skipped": self.shards_skipped, "negatives_by_source": self.negatives_by_source,
                "drops_by_reason": self.drops_by_reason, "synthetic_generated": self.synthetic_generated,
                "false_negatives_dropped": self.false_negatives_dropped, "gen_tokens": self.gen_tokens,
                "gen_seconds": round(self.gen_seconds, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "seconds": round(self.seconds, 2), "instruction_files": self.instruction_files,
                "actor_pools": self.actor_pools, "fingerprint": self.fingerprint, "reused": self.reused,
                "duplicates_dropped": self.duplicates_dropped}


def synth_fingerprint(cfg: PipelineConfig) -> Fingerprint:
    """The shards' fingerprint (the stage contract): what Synthesize reads of the config, the tasks' data, the
    dense-mining model and the generator."""
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    s = cfg.synth
    return fingerprint("synthesize", cfg, {
        "tasks": {spec: task_fingerprint(spec, cfg.run_dir) for spec in cfg.data.tasks},
        "dense_model": model_fingerprint(cfg.model.name_or_path) if "dense" in s.miners else None,
        "generator": model_fingerprint(s.generator) if s.engine == "vllm" and s.synthetic_per_query else s.generator})


def _expert_tag(task: RetrievalTask, spec: str, by: str) -> dict[str, str] | str:
    """A constant tag, or query id -> tag when experts are split by a query column."""
    base = safe_name(spec)
    if by == "task":
        return base
    if by not in task.queries.column_names:
        raise ConfigError(f"synth.expert_by: task {spec!r} has no query column {by!r} "
                          f"(it has: {', '.join(c for c in task.queries.column_names if c not in ('_id', 'text'))})")
    return {q: f"{base}-{by}{v}" for q, v in zip(task.queries.column("_id").to_pylist(),
                                                  task.queries.column(by).to_pylist())}


def plan_pairs(task: RetrievalTask, spec: str, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The task's (query, positive) rows in a fixed order, each with its shard number."""
    s, d = cfg.synth, cfg.data
    qrels = task.qrels_dict(d.train_split)
    qtext = dict(zip(task.queries.column("_id").to_pylist(), task.queries.column("text").to_pylist()))
    dtext = dict(zip(task.corpus.column("_id").to_pylist(), task.doc_texts()))
    qids = sorted(q for q in qrels if q in qtext and qtext[q].strip())
    if d.max_queries is not None and len(qids) > d.max_queries:
        qids = sorted(sorted(qids, key=lambda q: stable_fraction(q, f"sample{d.seed}"))[:d.max_queries])
    tags = _expert_tag(task, spec, s.expert_by)
    instruction = task_instruction(spec, task.name, cfg.model.query_instruction)
    rows = []
    for q in qids:
        judged = sorted(qrels[q])
        for p in sorted(doc for doc, score in qrels[q].items() if score > 0 and doc in dtext):
            rows.append({"kind": "negative", "key": f"{q}\x1f{p}", "gen": 0, "task": spec,
                         "expert": tags if isinstance(tags, str) else tags[q], "query_id": q, "query": qtext[q],
                         "positive_id": p, "positive": dtext[p], "instruction": instruction, "judged_ids": judged,
                         "description": "", "examples": []})
    if s.max_rows is not None and len(rows) > s.max_rows:
        chosen = set(sorted(range(len(rows)), key=lambda i: stable_fraction(rows[i]["key"], f"rows{s.seed}"))[:s.max_rows])
        rows = [r for i, r in enumerate(rows) if i in chosen]
    llm = range(len(rows)) if s.synthetic_max_rows is None or len(rows) <= s.synthetic_max_rows else set(
        sorted(range(len(rows)), key=lambda i: stable_fraction(rows[i]["key"], f"llm{s.seed}"))[:s.synthetic_max_rows])
    for i, r in enumerate(rows):
        r["shard"] = i // s.shard_size
        r["llm"] = s.synthetic_per_query > 0 and i in llm  # this row goes to the generator
    return rows


def _shard_path(out: Path, spec: str, shard: int) -> Path:
    return out / safe_name(spec) / f"part-{shard:05d}.parquet"


def _instruction_path(out: Path, spec: str) -> Path:
    return out / "instructions" / f"{safe_name(spec)}.json"


def corpus_cache_path(out: Path, spec: str, model_cfg, task: RetrievalTask) -> Path:
    """Where the base model's corpus embeddings of a task are cached (``out``: the synth folder), keyed by what
    changes them: the model's name, pooling, normalisation, length, document prefix, attention, dtype, and the
    corpus itself (a digest of its ids, titles and texts)."""
    m = model_cfg
    c = task.corpus
    digest = hashlib.sha1()
    for name in ("_id", "title", "text"):
        digest.update("\x1f".join(str(x) for x in c.column(name).to_pylist()).encode())
    key = hashlib.sha1(json.dumps([m.name_or_path, m.pooling, m.normalize, m.max_length, m.document_instruction,
                                   m.bidirectional, m.dtype, c.num_rows, digest.hexdigest()]).encode()).hexdigest()[:10]
    return out / "cache" / f"{safe_name(spec)}-{key}.npy"


def cached_corpus_embeddings(cfg: PipelineConfig, spec: str, model_cfg, task: RetrievalTask) -> np.ndarray | None:
    """The corpus embeddings mining (or the queries stage's round trip) cached for ``model_cfg``, if any (the
    evaluation of the base model reuses them instead of encoding the corpus again)."""
    path = corpus_cache_path(run_path(cfg.run_dir) / "synth", spec, model_cfg, task)
    if not path.is_file():
        return None
    emb = np.load(path)
    return emb if emb.shape[0] == task.corpus.num_rows else None


def _corpus_embeddings(task: RetrievalTask, spec: str, cfg: PipelineConfig, out: Path) -> np.ndarray:
    """Dense corpus embeddings with the base model, computed once by a Ray Data actor pool, cached per model."""
    from stm_ray.eval.ray_encode import ray_encode
    from stm_ray.modeling import Embedder
    from stm_ray.utils import atomic_write_bytes

    m = cfg.model
    path = corpus_cache_path(out, spec, m, task)
    if path.is_file():
        return np.load(path)
    table = pa.table({"_id": task.corpus.column("_id"), "text": task.doc_texts()})
    log.info("encoding %d documents of %s for dense mining", table.num_rows, spec)
    emb = ray_encode(table, Embedder.config_kwargs(cfg.model), prompt=m.document_instruction or "", batch_size=256,
                     num_cpus=_node_cpus())
    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write_bytes(path, buf.getvalue())
    return emb


def _node_cpus() -> int:
    """The CPUs of the largest node: the corpus encode runs alone (before mining), so one actor takes a node."""
    import ray

    return max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)))


def _instruction_rows(task: RetrievalTask, spec: str, cfg: PipelineConfig) -> list[dict[str, Any]]:
    n = cfg.synth.instruction_pool_size
    # examples from the train split only: a test query never reaches a prompt
    train = set(task.qrels_dict(cfg.data.train_split)) if cfg.data.train_split in task.qrels else set()
    qtext = [t for i, t in zip(task.queries.column("_id").to_pylist(), task.queries.column("text").to_pylist())
             if i in train]
    examples = sorted(qtext, key=lambda q: stable_fraction(q, "examples"))[:3]
    desc = task.description or f"retrieval task {task.name}"
    desc = f"{desc}. Example instruction: {task_instruction(spec, task.name, cfg.model.query_instruction)}"
    return [{"kind": "instruction", "key": f"instruction\x1f{spec}", "gen": g, "shard": -1, "task": spec,
             "expert": "", "query_id": "", "query": "", "positive_id": "", "positive": "", "instruction": "",
             "judged_ids": [], "description": desc, "examples": examples, "llm": True} for g in range(2 * n)]


def _use_gpu(cfg: PipelineConfig) -> bool:
    import ray

    if cfg.synth.use_gpu is not None:
        return cfg.synth.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def build_generator(cfg: PipelineConfig, query_max_tokens: int = 64):
    """The ray.data.llm processor the config asks for (``query_max_tokens``: for the queries stage's rows)."""
    from stm_ray.synth.llm import build_http_processor, build_vllm_processor

    if cfg.synth.engine == "openai":
        return build_http_processor(cfg.synth, query_max_tokens=query_max_tokens)
    return build_vllm_processor(cfg.synth, cfg.synth.generator, use_gpu=_use_gpu(cfg),
                                check_memory=single_node(), query_max_tokens=query_max_tokens)


def single_node() -> bool:
    """Whether the Ray cluster is this one machine: vLLM's KV-cache memory check reads this machine, so it is
    valid only then (on a multi-node cluster vLLM checks its budget on the engine's node)."""
    import ray

    local = len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    if not local:
        log.info("multi-node cluster: vLLM checks its KV-cache budget on the engine's node")
    return local


class _ShardWriter:
    """Collects streamed rows per shard; writes a shard (rows in plan order, stats in its metadata) once complete."""

    def __init__(self, out: Path, plan: dict[tuple[str, int], list[dict]], per_row: int, min_words: int,
                 strict: bool) -> None:
        self.out, self.plan, self.per_row, self.min_words, self.strict = out, plan, per_row, min_words, strict
        self.got: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        self.counts: dict[tuple[str, int], int] = Counter()
        # rows expected per shard: per_row generations of an LLM row, the mined row alone otherwise
        self.expected = {sid: sum(per_row if r["llm"] else 1 for r in rows) for sid, rows in plan.items()}
        self.written: list[Path] = []
        self.gen_tokens = 0
        self.seen: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)
        self.done: set[tuple[str, int]] = set()
        self.duplicates = 0

    def add(self, row: dict[str, Any]) -> None:
        sid = (row["task"], int(row["shard"]))
        ident = (row["key"], int(row.get("gen") or 0))
        if sid in self.done or ident in self.seen[sid]:
            # a row delivered twice (work redone after a node died): counted, written once
            self.duplicates += 1
            return
        self.seen[sid].add(ident)
        self.got[sid][row["key"]].append(row)
        self.counts[sid] += 1
        self.gen_tokens += int(row.get("gen_tokens") or 0)
        if self.counts[sid] == self.expected[sid]:
            self._write(sid)

    def _write(self, sid: tuple[str, int]) -> None:
        got = self.got.pop(sid)
        self.done.add(sid)
        self.seen.pop(sid, None)
        rows, drops, by_source, fn_dropped, generated = [], Counter(), Counter(), 0, 0
        for base in self.plan[sid]:
            parts = sorted(got[base["key"]], key=lambda r: int(r.get("gen") or 0))
            first = parts[0]
            negs = list(first.get("mined_negatives") or [])
            srcs = list(first.get("mined_sources") or [])
            fn_dropped += int(first.get("false_negatives_dropped") or 0)
            synthetic = []
            for r in parts:
                if "generated" not in r and "__inference_error__" not in r:
                    continue  # no generation stage (synth.synthetic_per_query = 0)
                generated += 1
                err = r.get("__inference_error__") or r.get("engine_error")
                if err:
                    if self.strict:
                        raise DataError(f"generator failed on query {base['query_id']!r}: {err}")
                    drops["engine_error"] += 1
                    continue
                text, reason = check_negative(r.get("generated"), base["query"], base["positive"],
                                              mined=negs[0] if negs else None, min_words=self.min_words)
                if reason is None and text not in synthetic and text not in negs:
                    synthetic.append(text)
                elif reason is not None:
                    drops[reason] += 1
            rows.append({"query_id": base["query_id"], "query": base["query"], "positive_id": base["positive_id"],
                         "positive": base["positive"], "negatives": synthetic + negs,
                         "negative_sources": ["synthetic"] * len(synthetic) + srcs,
                         "instruction": base["instruction"], "task": base["task"], "expert": base["expert"]})
            by_source.update(["synthetic"] * len(synthetic) + srcs)
        stats = {"rows": len(rows), "negatives_by_source": dict(by_source), "drops_by_reason": dict(drops),
                 "synthetic_generated": generated, "false_negatives_dropped": fn_dropped}
        path = write_shard(pa.Table.from_pylist(rows), _shard_path(self.out, *sid), stats=stats)
        self.written.append(path)


def _write_instructions(out: Path, spec: str, task: RetrievalTask, texts: list[str], n: int) -> Path:
    from stm_ray.utils import atomic_write_json

    # the task's own instruction first: a pool is never empty, even when a small generator writes nothing usable
    keep: list[str] = [task_instruction(spec, task.name, None)]
    for t in texts:
        c = clean_instruction(t)
        if c and c.lower() not in {k.lower() for k in keep}:
            keep.append(c)
    path = _instruction_path(out, spec)
    atomic_write_json(path, {"task": spec, "description": task.description, "instructions": keep[:n],
                             "generated": len(texts), "usable": len(keep) - 1})
    if len(keep) < n:
        log.warning("%s: %d of %d generated instructions usable (asked for %d)", spec, len(keep) - 1, len(texts), n)
    return path


def _totals(out: Path, result: SynthResult) -> None:
    by_source: Counter = Counter()
    drops: Counter = Counter()
    try:
        files = shard_files(out)
    except DataError:
        files = []
    for f in files:
        st = shard_stats(f)
        result.rows += int(st.get("rows", 0))
        by_source.update(st.get("negatives_by_source", {}))
        drops.update(st.get("drops_by_reason", {}))
        result.synthetic_generated += int(st.get("synthetic_generated", 0))
        result.false_negatives_dropped += int(st.get("false_negatives_dropped", 0))
    result.shards = len(files)
    result.negatives_by_source = {s: by_source.get(s, 0) for s in NEGATIVE_SOURCES}
    result.drops_by_reason = {r: drops.get(r, 0) for r in DROP_REASONS}
    for p in sorted((out / "instructions").glob("*.json")):
        pool = read_record(p, kind="instruction pool", require=("task",))
        if pool is not None:
            result.instruction_files[pool["task"]] = str(p)


def synthesize(cfg: PipelineConfig, *, show_progress: bool = True) -> SynthResult:
    """Mine and generate hard negatives for every train pair of ``cfg.data.tasks``; write missing shards only."""
    from tqdm.auto import tqdm

    from stm_ray.ray_setup import init_local_ray

    t0 = time.perf_counter()
    s = cfg.synth
    out = run_path(cfg.run_dir) / "synth"
    fp = synth_fingerprint(cfg)
    decision, manifest = prepare_shards(out, fp, cfg)
    if decision.action == "reuse":
        result = SynthResult(out, fingerprint=fp.value, reused=True)
        _totals(out, result)
        prev = manifest.record.get("result") or {}
        result.gen_tokens, result.gen_seconds = int(prev.get("gen_tokens", 0)), float(prev.get("gen_seconds", 0.0))
        result.seconds = time.perf_counter() - t0
        return result

    tasks: dict[str, RetrievalTask] = {}
    pending_rows: list[dict] = []
    plan: dict[tuple[str, int], list[dict]] = defaultdict(list)
    all_shards: set[tuple[str, int]] = set()
    skipped = 0
    instr_rows: list[dict] = []
    for spec in cfg.data.tasks:
        task = load_task(spec, strict=cfg.data.strict, run_dir=cfg.run_dir)
        tasks[spec] = task
        rows = plan_pairs(task, spec, cfg)
        if not rows:
            raise DataError(f"task {spec!r} has no (query, positive) pairs in split {cfg.data.train_split!r}")
        all_shards.update((spec, sh) for sh in {r["shard"] for r in rows})
        done = {sh for sh in {r["shard"] for r in rows} if _shard_path(out, spec, sh).is_file()}
        skipped += len(done)
        for r in rows:
            if r["shard"] not in done:
                plan[(spec, r["shard"])].append(r)
                pending_rows.append(r)
        if s.instruction_pool_size and not _instruction_path(out, spec).is_file():
            instr_rows.extend(_instruction_rows(task, spec, cfg))
    result = SynthResult(out, shards_skipped=skipped)
    log.info("synthesize: %d pair(s) in %d shard(s) to write, %d shard(s) already done, %d instruction prompt(s)",
             len(pending_rows), len(plan), skipped, len(instr_rows))

    if pending_rows or instr_rows:
        init_local_ray()
        import ray
        import ray.data
        from ray.data.expressions import col

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        writer = _ShardWriter(out, plan, max(s.synthetic_per_query, 1), s.min_words, cfg.data.strict)
        n_llm = sum(r["llm"] for r in pending_rows)
        # built (and its memory budget checked) before any mining: a generator that cannot start fails in seconds
        generator = build_generator(cfg) if n_llm or instr_rows else None
        mined = _mine(cfg, tasks, {r["task"] for r in pending_rows}, pending_rows, out) if pending_rows else None
        gen_parts, streams = [], []
        if mined is not None and n_llm < len(pending_rows):
            # rows with mined negatives only (synth.synthetic_max_rows, or synthetic_per_query = 0) skip the engine
            streams.append(mined if n_llm == 0 else mined.filter(expr=col("llm") == False, num_cpus=0.25))  # noqa: E712
        if mined is not None and n_llm:
            n = s.synthetic_per_query
            to_llm = mined if n_llm == len(pending_rows) else mined.filter(expr=col("llm") == True,  # noqa: E712
                                                                           num_cpus=0.25)
            gen_parts.append(to_llm if n == 1 else
                             to_llm.flat_map(lambda r: [{**r, "gen": g} for g in range(n)], num_cpus=0.25))
        if instr_rows:
            gen_parts.append(ray.data.from_arrow(_rows_table(instr_rows, mined=True)))
        if gen_parts:
            gen_ds = gen_parts[0] if len(gen_parts) == 1 else gen_parts[0].union(*gen_parts[1:])
            streams.append(generator(gen_ds))
        instr_texts: dict[str, list[tuple[int, str]]] = defaultdict(list)
        total = sum(writer.expected.values()) + len(instr_rows)
        bar = tqdm(total=total, desc="synthesize", unit="row", disable=not show_progress, dynamic_ncols=True)
        tg = time.perf_counter()
        done_rows, next_log = 0, 0.1
        for stream in streams:
            with ActorPoolSampler(stream) as sampler:
                for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        if row.get("kind") == "instruction":
                            instr_texts[row["task"]].append((int(row["gen"]), row.get("generated") or ""))
                        else:
                            writer.add(row)
                        bar.update(1)
                    done_rows += batch.num_rows
                    if writer.gen_tokens:
                        bar.set_postfix(tok_s=f"{writer.gen_tokens / (time.perf_counter() - tg):.0f}",
                                        shards=len(writer.written))
                    if not show_progress and done_rows >= next_log * total:
                        log.info("synthesize: %d/%d rows (%.0f%%), %d shard(s) written, %d engine actor(s)",
                                 done_rows, total, 100 * done_rows / total, len(writer.written),
                                 max((p[-1][1] for p in sampler.timelines.values()), default=0))
                        next_log = min(1.0, done_rows / total + 0.1)
            result.actor_pools.update(sampler.summary())
        bar.close()
        for op, pool in result.actor_pools.items():
            log.info("actor pool %s: %d actor(s) at peak, %d at the end (timeline: %s)", op, pool["peak_alive"],
                     pool["last_alive"], " ".join(f"{t:.0f}s:{a}" for t, a, _ in pool["timeline"][:20]))
        result.gen_seconds = time.perf_counter() - tg
        result.gen_tokens = writer.gen_tokens
        result.shards_written = len(writer.written)
        result.duplicates_dropped = writer.duplicates
        if writer.duplicates:
            log.info("synthesize: %d row(s) delivered twice (work redone after a failure) were written once",
                     writer.duplicates)
        missing = [sid for sid in plan if not _shard_path(out, *sid).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) did not receive all their rows (e.g. {missing[0]}); rerun to "
                               "resume")
        for spec, texts in instr_texts.items():
            _write_instructions(out, spec, tasks[spec], [t for _, t in sorted(texts)], s.instruction_pool_size)
    _totals(out, result)
    result.fingerprint = fp.value
    result.seconds = time.perf_counter() - t0
    shards = sorted(_shard_path(out, *sid).relative_to(out).as_posix() for sid in all_shards)
    manifest.done(result=result.to_dict(), shards=shards, config=cfg.model_dump(mode="json"))
    return result


def shard_blocks(rows: list[dict], table: pa.Table) -> list[pa.Table]:
    """``table`` (one row per ``rows`` entry, in order) cut into one block per (task, shard): a shard's rows travel
    together, so shards complete (and are written) one after another rather than all at the end."""
    starts = [0] + [i for i in range(1, len(rows)) if (rows[i]["task"], rows[i]["shard"]) !=
                    (rows[i - 1]["task"], rows[i - 1]["shard"])] + [len(rows)]
    return [table.slice(a, b - a) for a, b in zip(starts, starts[1:])]


def prepare_shards(out: Path, fp: Fingerprint, cfg: PipelineConfig) -> tuple[Decision, StageRecord]:
    """The stage contract for the shards in ``out``: reuse when the manifest is done under ``fp`` and lists shards
    that are all there; resume when it is running under ``fp``. Otherwise (run: no manifest, or one that is corrupt
    or foreign; redo: another fingerprint) whatever is in ``out`` was made by an unknown or another config: it is
    removed, and the manifest marked running, before any shard is written."""
    manifest = StageRecord(out / MANIFEST, fp, kind="synthesis manifest")
    decision = manifest.decide("shards", finished=lambda r: bool(r.get("shards")) and all(
        (out / f).is_file() for f in r["shards"]))
    if decision.action in ("run", "redo"):
        _clear(out)
    if decision.action != "reuse":
        manifest.begin(config=cfg.model_dump(mode="json"))
    return decision, manifest


def _clear(out: Path) -> None:
    """Remove what an earlier synthesis under another fingerprint wrote (the dense-embedding cache stays: it is
    keyed by its own model settings)."""
    import shutil

    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if p.is_dir() and p.name != "cache":
            shutil.rmtree(p)


def _rows_table(rows: list[dict], *, mined: bool = False) -> pa.Table:
    cols = {c: [r[c] for r in rows] for c in ROW_FIELDS}
    t = pa.table({**{c: pa.array(v, pa.list_(pa.string())) if c in ("judged_ids", "examples") else
                     pa.array(v, pa.int64()) if c in ("gen", "shard") else
                     pa.array(v, pa.bool_()) if c == "llm" else pa.array(v, pa.string())
                     for c, v in cols.items()}})
    # rows that skip mining still need the mined columns (one schema for the generation stage)
    return MineBatch.output(t) if mined else t


def _mine(cfg: PipelineConfig, tasks: dict[str, RetrievalTask], specs: set[str], rows: list[dict], out: Path):
    """The mining execution: MineBatch actors over the pending rows, materialised in the object store."""
    import ray
    import ray.data

    from stm_ray.modeling import Embedder

    s = cfg.synth
    corpora = {}
    for spec in sorted(specs):
        emb = _corpus_embeddings(tasks[spec], spec, cfg, out) if "dense" in s.miners else None
        corpora[spec] = {"ids": ray.put(tasks[spec].corpus.column("_id").to_pylist()),
                         "texts": ray.put(tasks[spec].doc_texts()),
                         "embeddings": ray.put(emb) if emb is not None else None}
    ds = ray.data.from_arrow(shard_blocks(rows, _rows_table(rows)))
    if not s.miners or s.negatives_per_miner == 0:
        return ds.map_batches(MineBatch.output, batch_format="pyarrow", num_cpus=0.25)
    t0 = time.perf_counter()
    mined = ds.map_batches(MineBatch, batch_format="pyarrow", batch_size=None,
                           compute=ray.data.ActorPoolStrategy(min_size=1, max_size=s.mine_concurrency),
                           num_cpus=s.mine_num_cpus,
                           fn_constructor_kwargs={"corpora": corpora, "miners": list(s.miners),
                                                  "model_kwargs": Embedder.config_kwargs(cfg.model), "depth": s.mine_depth,
                                                  "count": s.negatives_per_miner,
                                                  "margin": s.false_negative_margin}).materialize()
    log.info("mined %d row(s) with %s in %.1f s", mined.count(), "+".join(s.miners), time.perf_counter() - t0)
    return mined


def summary_table(result: SynthResult) -> str:
    """The end-of-stage summary: rows, negatives by source, drops by reason, generation speed."""
    from stm_ray.tables import format_table

    rows = [{"what": "rows (query, positive)", "count": result.rows},
            {"what": "shards (written now / already there)",
             "count": f"{result.shards} ({result.shards_written} / {result.shards_skipped})"}]
    rows += [{"what": f"negatives: {k}", "count": v} for k, v in result.negatives_by_source.items()]
    rows.append({"what": "false negatives filtered (mining)", "count": result.false_negatives_dropped})
    rows.append({"what": "LLM negatives generated", "count": result.synthetic_generated})
    rows += [{"what": f"  dropped: {k}", "count": v} for k, v in result.drops_by_reason.items() if v]
    kept = result.negatives_by_source.get("synthetic", 0)
    rows.append({"what": "  kept", "count": kept})
    lines = [format_table(rows, ["what", "count"])]
    if result.gen_seconds:
        lines.append(f"generation: {result.gen_tokens} tokens in {result.gen_seconds:.0f} s = "
                     f"{result.tokens_per_s:.1f} tokens/s (this run, engine start included)")
    for task, path in result.instruction_files.items():
        lines.append(f"instruction pool for {task}: {path}")
    lines.append(f"shards: {result.out_dir}   ({result.seconds:.0f} s)")
    return "\n".join(lines)
