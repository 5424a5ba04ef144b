"""The teacher stage: a score for every (query, candidate) of the synthesized shards, for ``train.distill``.

Two teachers (``teacher.kind``):

* ``reranker``: a reranker folder (the Rerankers stage's, or any cross-encoder / yes-no LLM folder) scores each
  row's query against its positive and every negative, in Ray Data actors; the score is the reranker's logit.
* ``llm``: LLM-Embedder's LLM feedback. The generator LLM reads ``teacher.template`` with the candidate as the
  user message and the row's query as its answer; the score is the mean log-probability of the query's tokens,
  read from vLLM's prompt log-probabilities (``ray.data.llm`` vLLM engine actors, the ones Synthesize runs, one
  output token per request). A candidate that helps the LLM produce the query gets a higher reward.

Layout under ``<run_dir>``::

    teacher/manifest.json                fingerprint, status, counts (rows, scored, failed, pairs/s)
    teacher/<task>/part-NNNNN.parquet    the source shard's rows with positive_score / negative_scores (schema 2)

The source is ``train.shards`` or ``<run_dir>/synth``. Shards are written atomically as their last score arrives
(their stats record the stage's fingerprint), so an interrupted stage resumes with the shards it has not written;
a changed teacher, template or source redoes the stage. A row with a failed request keeps null scores (it trains on
InfoNCE alone) and is counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from stm_ray.config import ConfigError, PipelineConfig
from stm_ray.data.shards import SCORE_COLUMNS, read_shards, shard_files, shard_stats, write_shard
from stm_ray.data.task import DataReport
from stm_ray.records import StageRecord, read_record
from stm_ray.stage import Fingerprint, fingerprint
from stm_ray.storage import run_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def teacher_source(cfg: PipelineConfig) -> Path:
    """The shards the teacher scores: ``train.shards`` or ``<run_dir>/synth``."""
    return Path(cfg.train.shards) if cfg.train.shards else run_path(cfg.run_dir) / "synth"


def reranker_folder(cfg: PipelineConfig) -> str:
    """``teacher.reranker`` as a folder: a name of ``rerank.rerankers`` is the run's ``rerankers/<name>``."""
    name = cfg.teacher.reranker or ""
    if name in [r.name for r in cfg.rerank.rerankers]:
        return str(run_path(cfg.run_dir) / "rerankers" / name)
    return name


def source_fingerprint(source: Path) -> str:
    """The source shards by what produced them: Synthesize's finished manifest, else every file's name, size and
    modification time."""
    record = read_record(source / MANIFEST, kind="synthesis manifest") if source.is_dir() else None
    if record and record.get("status") == "done" and record.get("fingerprint"):
        return f"synth:{record['fingerprint']}"
    h = hashlib.sha256()
    for f in shard_files(source):
        st = f.stat()
        h.update(f"{f.relative_to(source) if source.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()[:16]


def teacher_fingerprint(cfg: PipelineConfig) -> Fingerprint:
    from stm_ray.modeling import model_fingerprint

    source = teacher_source(cfg)
    inputs: dict[str, Any] = {"source": source_fingerprint(source)}
    if cfg.teacher.kind == "reranker":
        folder = reranker_folder(cfg)
        if not Path(folder).is_dir():
            hint = (" (the rerankers stage writes it: run it first, or list it in --stages)"
                    if cfg.teacher.reranker in [r.name for r in cfg.rerank.rerankers] else "")
            raise ConfigError(f"teacher.reranker: no reranker folder at {folder}{hint}")
        inputs["reranker"] = model_fingerprint(folder)
    return fingerprint("teacher", cfg, inputs)


# ---------------------------------------------------------------------------------------------------- candidates
def candidates(table: pa.Table, sid: int, max_chars: int) -> list[dict[str, Any]]:
    """One item per (row, candidate) of a shard: candidate 0 is the positive, ``j + 1`` the row's j-th negative."""
    out = []
    for r, (q, p, negs) in enumerate(zip(table.column("query").to_pylist(), table.column("positive").to_pylist(),
                                         table.column("negatives").to_pylist())):
        for c, doc in enumerate([p, *(negs or [])]):
            out.append({"sid": sid, "row": r, "cand": c, "query": q, "document": doc[:max_chars]})
    return out


class RerankerScorer:
    """Ray Data actor: a reranker's logits for a batch of (query, document) pairs."""

    def __init__(self, path: str, batch_size: int, threads: int) -> None:
        import torch

        from stm_ray.rerank.model import load_reranker

        torch.set_num_threads(max(1, threads))
        self.model = load_reranker(path)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        scores = self.model.score_pairs(list(batch["query"]), list(batch["document"]), batch_size=self.batch_size,
                                        logits=True)
        return {"sid": batch["sid"], "row": batch["row"], "cand": batch["cand"],
                "score": np.asarray(scores, dtype=np.float64), "error": np.asarray([""] * len(scores), dtype=object)}


def _reranker_rows(items: list[dict[str, Any]], cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    import ray

    from stm_ray.synth.negatives import _node_cpus

    # one actor with the CPUs it uses as torch threads: all but one of the largest node's (the driver's share)
    threads = max(1, _node_cpus() - 1)
    ds = ray.data.from_items(items).map_batches(
        RerankerScorer, fn_constructor_kwargs={"path": reranker_folder(cfg), "batch_size": cfg.teacher.batch_size,
                                               "threads": threads},
        batch_size=cfg.teacher.batch_size * 4, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=threads, batch_format="numpy")
    yield from ds.iter_rows()


def feedback_prompts(items: list[dict[str, Any]], tokenizer, template: str, max_len: int) -> None:
    """Token ids of the LLM-feedback prompt for each item, in place: ``ids`` = the chat prompt with the candidate
    (cut by tokens to fit ``max_len``) + the query's tokens; ``prefix`` = where the query starts."""
    def render(doc: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": template.format(document=doc)}],
                                             add_generation_prompt=True, tokenize=False)

    overhead = len(tokenizer(render(""), add_special_tokens=False)["input_ids"])
    docs = tokenizer([it["document"] for it in items], add_special_tokens=False)["input_ids"]
    queries = tokenizer([it["query"] for it in items], add_special_tokens=False)["input_ids"]
    for it, d_ids, q_ids in zip(items, docs, queries):
        q_ids = q_ids[:max(1, max_len // 4)]
        budget = max(0, max_len - overhead - len(q_ids) - 8)
        doc = it["document"] if len(d_ids) <= budget else tokenizer.decode(d_ids[:budget])
        prefix = tokenizer(render(doc), add_special_tokens=False)["input_ids"]
        it["ids"] = prefix + q_ids
        it["prefix"] = len(prefix)


def mean_logprob(prompt_logprobs: Any, token_ids: list[int], start: int) -> float:
    """Mean log-probability of ``token_ids[start:]`` from vLLM's per-position prompt log-probabilities (a dict
    ``{token id: {"logprob": ...}}`` per position; keys may have become strings on the way through Arrow)."""
    vals = []
    for pos in range(start, len(token_ids)):
        entry = prompt_logprobs[pos] if pos < len(prompt_logprobs) else None
        if entry is None:
            return math.nan
        tok = token_ids[pos]
        info = entry.get(tok, entry.get(str(tok))) if isinstance(entry, dict) else None
        if info is None:
            return math.nan
        lp = info.get("logprob") if isinstance(info, dict) else getattr(info, "logprob", None)
        if lp is None:
            return math.nan
        vals.append(float(lp))
    return sum(vals) / len(vals) if vals else math.nan


def _llm_rows(items: list[dict[str, Any]], cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    import ray
    from ray.data.llm import build_processor
    from transformers import AutoTokenizer

    from stm_ray.modeling.aliases import resolve_model
    from stm_ray.synth.llm import LIGHT_CPU, vllm_processor_config
    from stm_ray.synth.negatives import _use_gpu, single_node

    s = cfg.synth.model_copy(update={"generator": cfg.teacher.generator or cfg.synth.generator})
    model_dir = resolve_model(s.generator)
    feedback_prompts(items, AutoTokenizer.from_pretrained(model_dir), cfg.teacher.template, s.max_model_len - 1)
    # the prompt arrives as token ids (the query's tokens must be known exactly): no chat-template stage
    config = vllm_processor_config(s, model_dir, use_gpu=_use_gpu(cfg), check_memory=single_node(),
                                   chat_template_stage=False)

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        return {"sid": row["sid"], "row": row["row"], "cand": row["cand"], "prefix": row["prefix"],
                "tokenized_prompt": list(row["ids"]),
                "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        lps, ids = row.get("prompt_logprobs"), row.get("prompt_token_ids")
        score = math.nan if lps is None or ids is None else mean_logprob(list(lps), list(ids), int(row["prefix"]))
        err = str(row.get("__inference_error__") or "")[:300] if math.isnan(score) else ""
        return {"sid": row["sid"], "row": row["row"], "cand": row["cand"], "score": score,
                "error": err or ("no prompt log-probabilities" if math.isnan(score) else "")}

    processor = build_processor(config, preprocess=pre, postprocess=post,
                                preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                                postprocess_map_kwargs={"num_cpus": LIGHT_CPU})
    ds = ray.data.from_items([{k: it[k] for k in ("sid", "row", "cand", "prefix", "ids")} for it in items])
    yield from processor(ds).iter_rows()


# ---------------------------------------------------------------------------------------------------- the stage
class _ScoreWriter:
    """Collects streamed scores per shard; writes a shard (its rows + score columns) once every candidate is in."""

    def __init__(self, sources: dict[int, tuple[Path, Path, pa.Table]], fp: str, kind: str) -> None:
        self.sources, self.fp, self.kind = sources, fp, kind
        self.need = {sid: sum(1 + len(n or []) for n in t.column("negatives").to_pylist())
                     for sid, (_, _, t) in sources.items()}
        self.scores: dict[int, dict[tuple[int, int], float]] = {sid: {} for sid in sources}
        self.failed_pairs = 0
        self.errors: list[str] = []
        self.rows = self.scored = 0

    def add(self, row: dict[str, Any]) -> None:
        sid, score = int(row["sid"]), float(row["score"])
        if math.isnan(score):
            self.failed_pairs += 1
            if row.get("error") and len(self.errors) < 5:
                self.errors.append(str(row["error"]))
        self.scores[sid][(int(row["row"]), int(row["cand"]))] = score
        if len(self.scores[sid]) == self.need[sid]:
            self._write(sid)

    def _write(self, sid: int) -> None:
        src, dst, table = self.sources[sid]
        got = self.scores.pop(sid)
        pos, negs = [], []
        for r, n in enumerate(table.column("negatives").to_pylist()):
            vals = [got[(r, c)] for c in range(1 + len(n or []))]
            if any(math.isnan(v) for v in vals):
                pos.append(None)
                negs.append(None)
            else:
                pos.append(vals[0])
                negs.append(vals[1:])
                self.scored += 1
            self.rows += 1
        t = table.drop_columns([c for c in SCORE_COLUMNS if c in table.column_names])
        t = t.append_column("positive_score", pa.array(pos, pa.float64()))
        t = t.append_column("negative_scores", pa.array(negs, pa.list_(pa.float64())))
        stats = {**shard_stats(src), "teacher_fingerprint": self.fp, "teacher": self.kind}
        write_shard(t, dst, stats=stats)


def teacher_scores(cfg: PipelineConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Score every row of the source shards with the configured teacher and write ``<run_dir>/teacher`` (see the
    module docstring); returns the stage's counts (with its fingerprint)."""
    from tqdm.auto import tqdm

    from stm_ray.ray_setup import init_local_ray

    if cfg.teacher.kind is None:
        raise ConfigError("the teacher stage needs teacher.kind: 'reranker' (with teacher.reranker) or 'llm'")
    t0 = time.perf_counter()
    source = teacher_source(cfg)
    out = run_path(cfg.run_dir) / "teacher"
    fp = teacher_fingerprint(cfg)
    manifest = StageRecord(out / MANIFEST, fp, kind="teacher manifest")
    files = shard_files(source)
    rel = {f: (f.relative_to(source) if source.is_dir() else Path(f.name)) for f in files}
    action = manifest.decide("scores", finished=lambda r: all((out / rel[f]).is_file() for f in files)).action
    if action == "reuse":
        return {**manifest.record["counts"], "fingerprint": fp.value, "reused": True}
    if action == "redo" and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest.begin(config=cfg.model_dump(mode="json"))

    report = DataReport()
    todo: dict[int, tuple[Path, Path, pa.Table]] = {}
    done = 0
    for sid, f in enumerate(files):
        dst = out / rel[f]
        if dst.is_file() and shard_stats(dst).get("teacher_fingerprint") == fp.value:
            done += 1
            continue
        todo[sid] = (f, dst, read_shards(f, strict=cfg.data.strict, report=report))
    items = [it for sid, (_, _, t) in todo.items() for it in candidates(t, sid, cfg.teacher.max_document_chars)]
    log.info("teacher %s: %d shard(s) of %s to score (%d already done), %d (query, candidate) pairs",
             cfg.teacher.kind, len(todo), source, done, len(items))
    writer = _ScoreWriter(todo, fp.value, cfg.teacher.kind)
    ts = time.perf_counter()
    if items:
        init_local_ray()
        stream = _reranker_rows(items, cfg) if cfg.teacher.kind == "reranker" else _llm_rows(items, cfg)
        bar = tqdm(total=len(items), desc=f"teacher ({cfg.teacher.kind})", unit="pair", disable=not show_progress,
                   mininterval=2.0)
        for row in stream:
            writer.add(row)
            bar.update(1)
        bar.close()
    score_s = time.perf_counter() - ts
    missing = [str(d) for _, d, _ in todo.values() if not d.is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} teacher shard(s) did not receive all their scores (e.g. {missing[0]}); "
                           "rerun to resume")
    if writer.errors:
        log.warning("teacher: %d pair(s) without a score (their rows keep null scores), e.g. %s",
                    writer.failed_pairs, writer.errors[0])
    counts = {"kind": cfg.teacher.kind, "source": str(source), "shards": len(files), "shards_scored": len(todo),
              "rows": writer.rows, "rows_scored": writer.scored, "pairs": len(items),
              "pairs_failed": writer.failed_pairs, "bad_rows": report.counts(),
              "pairs_per_s": round(len(items) / score_s, 2) if items and score_s > 0 else None,
              "seconds": round(time.perf_counter() - t0, 2)}
    manifest.done(counts=counts, config=cfg.model_dump(mode="json"))
    log.info("teacher %s: %d of %d rows scored (%d pairs failed) in %.0f s", cfg.teacher.kind, writer.scored,
             writer.rows, writer.failed_pairs, counts["seconds"])
    return {**counts, "fingerprint": fp.value}
