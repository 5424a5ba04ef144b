"""The queries stage: synthetic (query, document) pairs for ``docs:`` tasks, a corpus without queries.

For each ``docs:`` task of ``data.tasks``:

1. **Sample** ``queries.max_documents`` documents (deterministic, by document id) with at least
   ``queries.min_document_words`` words.
2. **Generate** ``queries.per_document`` queries per document, the ``queries.kinds`` in turn (a short keyword query,
   a natural question, a lay person's phrasing, a longer need that takes reasoning; templates in
   ``queries.prompts``; few-shot ``queries.examples``), through the generator Synthesize uses (``ray.data.llm``
   vLLM actors, or an OpenAI-compatible endpoint). Written as raw parquet shards of ``queries.shard_size``
   generations as soon as each is complete: a rerun generates only the missing shards.
3. **Filter**, every drop counted by reason: lexical (``empty``, ``refusal``, ``boilerplate``, ``too_short``,
   ``too_long``, ``copy_of_document``, ``duplicate``; :func:`stm_ray.synth.checks.check_query`); ``round_trip``
   (the base retriever does not put the source document in its top ``queries.round_trip_k``); ``score`` (below
   ``queries.min_score`` by ``queries.reranker``; skipped, and logged, without one); ``too_easy`` (optional).
   The round trip and the score run as Ray tasks.
4. **Split** the documents with kept queries into train / dev / test (disjoint document sets); with
   ``queries.real_test`` and a source that has a test split (``docs:icd10``, ``docs:beir:DIR``), its real test
   queries are the test split instead. Splits made of synthetic queries are recorded as such and marked wherever
   their numbers are printed.

Output, ``<run_dir>/queries/<docs-name>/``: a BEIR folder (``corpus.jsonl``, ``queries.jsonl`` with each query's
``kind`` and source ``doc``, ``qrels/{train,dev,test}.tsv``) that every later stage reads when it loads the
``docs:`` spec with the run directory, ``raw/part-*.parquet`` (every generation, with its drop reason after
filtering) and ``manifest.json`` (fingerprint, counts, examples; written last). Stage contract: the fingerprint
covers ``queries.*``, the generator settings, the base model (round trip), the reranker and the source data; the
raw generations carry their own fingerprint, so changing only a filter setting refilters without generating again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stm_ray.config import PipelineConfig
from stm_ray.data import DataError, RetrievalTask
from stm_ray.data.docs import SYNTH_MANIFEST, load_docs, synthetic_folder
from stm_ray.data.task import stable_fraction
from stm_ray.records import StageRecord, read_record, write_record
from stm_ray.stage import Fingerprint, combine, fingerprint
from stm_ray.storage import run_path
from stm_ray.synth.checks import QUERY_LEXICAL_REASONS, check_query, normalize_query
from stm_ray.synth.prompts import QUERY_PROMPTS

log = logging.getLogger(__name__)

DROP_REASONS = (*QUERY_LEXICAL_REASONS, "round_trip", "score", "too_easy")
RAW_MANIFEST = "raw/manifest.json"


def docs_tasks(cfg: PipelineConfig) -> list[str]:
    return [t for t in cfg.data.tasks if t.startswith("docs:")]


def _source_task(cfg: PipelineConfig, spec: str) -> RetrievalTask:
    q = cfg.queries
    return load_docs(spec.removeprefix("docs:"), strict=cfg.data.strict, passage_words=q.passage_words,
                     passage_overlap=q.passage_overlap)


def generation_fingerprint(cfg: PipelineConfig, spec: str) -> Fingerprint:
    """The raw generations' fingerprint: what is sampled and how it is prompted and decoded."""
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    s = cfg.synth
    return fingerprint("query-generations", cfg, {
        "source": task_fingerprint(spec),
        "generator": model_fingerprint(s.generator) if s.engine == "vllm" else s.generator})


def queries_fingerprint(cfg: PipelineConfig, spec: str, generations: Fingerprint | None = None) -> Fingerprint:
    """The synthetic task's fingerprint: the generations, every filter and split setting, the base model (round
    trip) and the reranker (score filter)."""
    from stm_ray.modeling import model_fingerprint

    q = cfg.queries
    gen = generations or generation_fingerprint(cfg, spec)
    uses_retriever = q.round_trip_k is not None or q.drop_easy
    return fingerprint("queries", cfg, {
        "generations": gen.value,
        "retriever": model_fingerprint(cfg.model.name_or_path) if uses_retriever else None,
        "reranker": model_fingerprint(q.reranker) if q.reranker else None})


def plan_queries(task: RetrievalTask, spec: str, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The generation rows of one task in a fixed order: sampled documents x ``per_document``, each with its kind
    and raw shard number. Rows carry the generator's columns (see :mod:`stm_ray.synth.llm`): for a query row,
    ``description`` is the kind, ``instruction`` its prompt template, ``positive`` the document."""
    from stm_ray.data.task import doc_text

    q = cfg.queries
    c = task.corpus
    docs = [(i, doc_text(t, x)) for i, t, x in zip(c.column("_id").to_pylist(), c.column("title").to_pylist(),
                                                    c.column("text").to_pylist())]
    docs = [(i, d) for i, d in docs if len(d.split()) >= q.min_document_words]
    if q.max_documents is not None and len(docs) > q.max_documents:
        docs = sorted(docs, key=lambda r: stable_fraction(r[0], f"docs{q.seed}"))[:q.max_documents]
    docs.sort(key=lambda r: r[0])
    templates = {**QUERY_PROMPTS, **q.prompts}
    rows = []
    for doc_id, text in docs:
        first = int(stable_fraction(doc_id, f"kind{q.seed}") * len(q.kinds))
        for g in range(q.per_document):
            kind = q.kinds[(first + g) % len(q.kinds)]
            n = len(rows)
            rows.append({"kind": "query", "key": f"{doc_id}\x1f{g}", "gen": g, "shard": n // q.shard_size,
                         "task": spec, "expert": "", "query_id": "", "query": "", "positive_id": doc_id,
                         "positive": text, "instruction": templates[kind], "judged_ids": [], "description": kind,
                         "examples": list(q.examples), "llm": True})
    return rows


def _raw_path(folder: Path, shard: int) -> Path:
    return folder / "raw" / f"part-{shard:05d}.parquet"


def _write_parquet(path: Path, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    from stm_ray.utils import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


class _RawWriter:
    """Collects streamed generations per (task, shard); writes a raw shard once all its rows are in."""

    def __init__(self, folders: dict[str, Path], expected: dict[tuple[str, int], int]) -> None:
        self.folders, self.expected = folders, expected
        self.got: dict[tuple[str, int], list[dict]] = defaultdict(list)
        self.written = 0
        self.gen_tokens: Counter = Counter()

    def add(self, row: dict[str, Any]) -> None:
        sid = (row["task"], int(row["shard"]))
        err = row.get("__inference_error__") or row.get("engine_error") or ""
        self.got[sid].append({"doc_id": row["positive_id"], "gen": int(row["gen"]), "kind": row["description"],
                              "generated": row.get("generated") or "", "gen_tokens": int(row.get("gen_tokens") or 0),
                              "engine_error": str(err)[:300]})
        self.gen_tokens[row["task"]] += int(row.get("gen_tokens") or 0)
        if len(self.got[sid]) == self.expected[sid]:
            rows = sorted(self.got.pop(sid), key=lambda r: (r["doc_id"], r["gen"]))
            _write_parquet(_raw_path(self.folders[sid[0]], sid[1]), pa.Table.from_pylist(rows))
            self.written += 1


def _generate(cfg: PipelineConfig, pending: list[dict], folders: dict[str, Path], show_progress: bool
              ) -> tuple[Counter, float, int]:
    """Stream ``pending`` rows through the generator; returns (generated tokens per task, seconds, shards)."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from stm_ray.synth.autoscale import ActorPoolSampler
    from stm_ray.synth.negatives import _rows_table, build_generator, shard_blocks

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    expected = Counter((r["task"], r["shard"]) for r in pending)
    writer = _RawWriter(folders, dict(expected))
    generator = build_generator(cfg, query_max_tokens=cfg.queries.max_new_tokens)
    ds = generator(ray.data.from_arrow(shard_blocks(pending, _rows_table(pending, mined=True))))
    bar = tqdm(total=len(pending), desc="queries", unit="query", disable=not show_progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    done, next_log = 0, 0.1
    with ActorPoolSampler(ds):
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                writer.add(row)
            done += batch.num_rows
            bar.update(batch.num_rows)
            tok = sum(writer.gen_tokens.values())
            bar.set_postfix(tok_s=f"{tok / (time.perf_counter() - t0):.0f}", shards=writer.written)
            if not show_progress and done >= next_log * len(pending):
                log.info("queries: %d/%d generated (%.0f%%), %d raw shard(s) written", done, len(pending),
                         100 * done / len(pending), writer.written)
                next_log = min(1.0, done / len(pending) + 0.1)
    bar.close()
    missing = [sid for sid in expected if not _raw_path(folders[sid[0]], sid[1]).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} raw shard(s) did not receive all their rows (e.g. {missing[0]}); rerun to "
                           "resume")
    return writer.gen_tokens, time.perf_counter() - t0, writer.written


def _round_trip(corpus_emb: np.ndarray, model_kwargs: dict, queries: list[str], sources: list[int],
                batch: int = 256) -> tuple[list[int], list[float]]:
    """Rank of each query's source document under the base retriever (0 = first) and the cosine margin of the
    source over the best other document (negative when another document is ahead)."""
    from stm_ray.modeling import Embedder

    emb = Embedder.from_pretrained(**model_kwargs)
    q = np.asarray(emb.encode_queries(queries), dtype=np.float32)
    ranks, margins = [], []
    for a in range(0, len(queries), batch):
        s = q[a:a + batch] @ corpus_emb.T
        src = np.asarray(sources[a:a + batch])
        own = s[np.arange(len(src)), src]
        s[np.arange(len(src)), src] = -np.inf
        ranks.extend((s > own[:, None]).sum(axis=1).tolist())
        margins.extend((own - s.max(axis=1)).tolist())
    return ranks, margins


def _rerank_scores(folder: str, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    from stm_ray.rerank.model import load_reranker

    return [float(x) for x in load_reranker(folder).score_pairs([a for a, _ in pairs], [b for _, b in pairs],
                                                                  batch_size=batch_size)]


def filter_queries(cfg: PipelineConfig, task: RetrievalTask, spec: str, raw: list[dict], out_synth: Path
                   ) -> tuple[list[dict], Counter]:
    """Every raw generation with ``query`` (cleaned) and ``drop`` (a reason, or "" when kept); the drop counts."""
    import ray

    from stm_ray.data.task import doc_text
    from stm_ray.modeling import Embedder
    from stm_ray.synth.negatives import _corpus_embeddings

    q = cfg.queries
    c = task.corpus
    ids = c.column("_id").to_pylist()
    index = {d: i for i, d in enumerate(ids)}
    texts = [doc_text(t, x) for t, x in zip(c.column("title").to_pylist(), c.column("text").to_pylist())]
    drops: Counter = Counter()
    seen: set[str] = set()
    for r in raw:
        r["query"], r["drop"] = "", ""
        if r["engine_error"]:
            r["drop"] = "engine_error"
        else:
            r["query"], reason = check_query(r["generated"], texts[index[r["doc_id"]]], min_words=q.min_words,
                                             max_words=q.max_words, doc_id=r["doc_id"])
            if reason is None and normalize_query(r["query"]) in seen:
                reason = "duplicate"
            if reason is None:
                seen.add(normalize_query(r["query"]))
            r["drop"] = reason or ""
        if r["drop"]:
            drops[r["drop"]] += 1
    live = [r for r in raw if not r["drop"]]
    if live and (q.round_trip_k is not None or q.drop_easy):
        corpus_emb = _corpus_embeddings(task, spec, cfg, out_synth)
        ranks, margins = ray.get(ray.remote(num_cpus=1)(_round_trip).remote(
            ray.put(corpus_emb), Embedder.config_kwargs(cfg.model), [r["query"] for r in live],
            [index[r["doc_id"]] for r in live]))
        for r, rank, margin in zip(live, ranks, margins):
            r["rank"], r["margin"] = int(rank), round(float(margin), 4)
            if q.round_trip_k is not None and rank >= q.round_trip_k:
                r["drop"] = "round_trip"
            elif q.drop_easy and rank == 0 and margin >= q.easy_margin:
                r["drop"] = "too_easy"
            if r["drop"]:
                drops[r["drop"]] += 1
        live = [r for r in live if not r["drop"]]
    elif q.round_trip_k is None:
        log.info("%s: round-trip filter off (queries.round_trip_k = null)", spec)
    if q.reranker and live:
        scores = ray.get(ray.remote(num_cpus=1)(_rerank_scores).remote(
            q.reranker, [(r["query"], texts[index[r["doc_id"]]]) for r in live], cfg.rerank.score_batch_size))
        for r, s in zip(live, scores):
            r["score"] = float(s)
            if s < q.min_score:
                r["drop"] = "score"
                drops["score"] += 1
    elif not q.reranker:
        log.info("%s: score filter skipped (no queries.reranker given; a reranker folder from stm-ray train-reranker "
                 "enables it)", spec)
    return raw, drops


def split_documents(doc_ids: list[str], cfg: PipelineConfig, synthetic_test: bool) -> dict[str, str]:
    """Document id -> split (train / dev / test): disjoint document sets, by a hash of the id; dev (and a
    synthetic test) get at least one document each when there are enough documents."""
    q = cfg.queries
    test = q.test_fraction if synthetic_test else 0.0
    frac = {d: stable_fraction(d, f"split{q.seed}") for d in doc_ids}
    out = {d: "test" if f < test else "dev" if f < test + q.dev_fraction else "train" for d, f in frac.items()}
    if out and "train" not in out.values():  # training comes first: the highest fraction goes back to train
        out[max(out, key=lambda d: frac[d])] = "train"
    needs = (["dev"] if q.dev_fraction > 0 else []) + (["test"] if test > 0 else [])
    for split in needs:
        if split not in out.values() and sum(s == "train" for s in out.values()) >= 2:
            out[min((d for d, s in out.items() if s == "train"), key=lambda d: frac[d])] = split
    return out


def _query_id(doc_id: str, gen: int) -> str:
    return "syn-" + hashlib.sha1(f"{doc_id}\x1f{gen}".encode()).hexdigest()[:12]


def _write_task(folder: Path, task: RetrievalTask, kept: list[dict], splits: dict[str, str],
                real_test: bool) -> dict[str, int]:
    """The BEIR folder of the synthetic task (each file atomically); returns queries per split."""
    from stm_ray.utils import atomic_write_text

    c = task.corpus
    atomic_write_text(folder / "corpus.jsonl", "".join(
        json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=False) + "\n"
        for i, t, x in zip(c.column("_id").to_pylist(), c.column("title").to_pylist(), c.column("text").to_pylist())))
    lines, qrels = [], defaultdict(list)
    for r in kept:
        qid = _query_id(r["doc_id"], r["gen"])
        lines.append(json.dumps({"_id": qid, "text": r["query"], "kind": r["kind"], "doc": r["doc_id"]},
                                ensure_ascii=False) + "\n")
        qrels[splits[r["doc_id"]]].append(f"{qid}\t{r['doc_id']}\t1\n")
    counts = {s: len(qrels[s]) for s in ("train", "dev", "test")}
    if real_test:
        qt = task.queries
        lines += [json.dumps({"_id": i, "text": t, "kind": "real"}, ensure_ascii=False) + "\n"
                  for i, t in zip(qt.column("_id").to_pylist(), qt.column("text").to_pylist())]
        t = task.qrels["test"]
        qrels["test"] = [f"{a}\t{b}\t{s}\n" for a, b, s in zip(t.column("query-id").to_pylist(),
                                                                t.column("corpus-id").to_pylist(),
                                                                t.column("score").to_pylist())]
        counts["test"] = len(set(t.column("query-id").to_pylist()))
    atomic_write_text(folder / "queries.jsonl", "".join(lines))
    for split in ("train", "dev", "test"):
        atomic_write_text(folder / "qrels" / f"{split}.tsv", "query-id\tcorpus-id\tscore\n" + "".join(qrels[split]))
    return counts


def _examples(raw: list[dict], per_kind: int = 2) -> dict[str, Any]:
    kept: dict[str, list[str]] = defaultdict(list)
    dropped: list[dict[str, str]] = []
    for r in raw:
        if not r["drop"] and len(kept[r["kind"]]) < per_kind:
            kept[r["kind"]].append(r["query"])
        elif r["drop"] and len(dropped) < 6 and r["drop"] not in {d["reason"] for d in dropped}:
            dropped.append({"query": (r["query"] or r["generated"])[:160], "reason": r["drop"]})
    return {"kept": dict(kept), "dropped": dropped}


def synthesize_queries(cfg: PipelineConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """The queries stage over every ``docs:`` task of ``cfg.data.tasks``; returns the counts per task (also each
    task's ``manifest.json``)."""
    from stm_ray.ray_setup import init_local_ray

    t0 = time.perf_counter()
    q = cfg.queries
    run_dir = run_path(cfg.run_dir)
    results: dict[str, Any] = {}
    fps: dict[str, str] = {}
    todo: dict[str, tuple[RetrievalTask, list[dict], StageRecord]] = {}
    pending: list[dict] = []
    folders: dict[str, Path] = {}
    for spec in docs_tasks(cfg):
        folder = synthetic_folder(run_dir, spec)
        folders[spec] = folder
        gen_fp = generation_fingerprint(cfg, spec)
        fp = queries_fingerprint(cfg, spec, gen_fp)
        manifest = StageRecord(folder / SYNTH_MANIFEST, fp, kind="queries manifest")
        action = manifest.decide(spec).action
        fps[spec] = fp.value
        if action == "reuse":
            results[spec] = manifest.record["result"]
            continue
        raw_rec = read_record(folder / RAW_MANIFEST, kind="raw generations manifest")
        if raw_rec is None or raw_rec.get("fingerprint") != gen_fp.value:
            if (folder / "raw").exists():
                log.info("%s: the raw generations were made under %s: generating again", spec,
                         "another fingerprint" if raw_rec else "an unknown fingerprint (no readable raw/manifest.json)")
            shutil.rmtree(folder / "raw", ignore_errors=True)
        # unfinished until the filtered task is written: a rerun under the same fingerprint resumes
        manifest.begin(spec=spec)
        write_record(folder / RAW_MANIFEST, {**gen_fp.record(), "spec": spec})
        task = _source_task(cfg, spec)
        rows = plan_queries(task, spec, cfg)
        if not rows:
            raise DataError(f"{spec}: no document with at least {q.min_document_words} words to write queries for")
        done = {r["shard"] for r in rows if _raw_path(folder, r["shard"]).is_file()}
        pending += [r for r in rows if r["shard"] not in done]
        todo[spec] = (task, rows, manifest)
        log.info("queries %s: %d document(s) sampled of %d, %d generation(s) in %d raw shard(s), %d already done",
                 spec, len(rows) // q.per_document, task.corpus.num_rows, len(rows),
                 len({r["shard"] for r in rows}), len(done))
    if not todo:
        return {"tasks": results, "seconds": round(time.perf_counter() - t0, 2),
                "fingerprint": combine([fps[t] for t in sorted(fps)])}
    init_local_ray()
    tokens, gen_seconds, shards = (_generate(cfg, pending, folders, show_progress) if pending
                                   else (Counter(), 0.0, 0))
    for spec, (task, rows, manifest) in todo.items():
        import pyarrow.parquet as pq

        folder = folders[spec]
        files = sorted({_raw_path(folder, r["shard"]) for r in rows})
        raw = [r for f in files for r in pq.read_table(f).to_pylist()]
        raw, drops = filter_queries(cfg, task, spec, raw, run_dir / "synth")
        kept = [r for r in raw if not r["drop"]]
        if not kept:
            raise DataError(f"{spec}: no generated query passed the filters ({dict(drops)}); see "
                            f"{folder / 'raw'} (every generation with its drop reason) and loosen queries.* "
                            "(e.g. queries.round_trip_k) or use a stronger synth.generator")
        real_test = q.real_test and "test" in task.qrels and task.qrels["test"].num_rows > 0
        splits = split_documents(sorted({r["doc_id"] for r in kept}), cfg, synthetic_test=not real_test)
        counts = _write_task(folder, task, kept, splits, real_test)
        _write_parquet(folder / "raw" / "filtered.parquet", pa.Table.from_pylist(
            [{k: r.get(k) for k in ("doc_id", "gen", "kind", "generated", "query", "drop", "rank", "margin", "score")}
             for r in raw]))
        by_kind = {k: {"generated": sum(r["kind"] == k for r in raw),
                       "kept": sum(r["kind"] == k and not r["drop"] for r in raw)} for k in q.kinds}
        synthetic_splits = ["train", "dev"] + ([] if real_test else ["test"])
        gen_tok = int(tokens.get(spec, 0))
        result = {"documents": task.corpus.num_rows, "documents_sampled": len(rows) // q.per_document,
                  "generated": len(raw), "kept": len(kept), "yield": round(len(kept) / len(raw), 4),
                  "by_kind": by_kind, "drops": {r: int(drops.get(r, 0)) for r in DROP_REASONS},
                  "filters": {"round_trip_k": q.round_trip_k, "reranker": q.reranker,
                              "min_score": q.min_score if q.reranker else None, "drop_easy": q.drop_easy},
                  "splits": counts, "documents_by_split": dict(Counter(splits.values())),
                  "test": "real" if real_test else "synthetic", "synthetic_splits": synthetic_splits,
                  "gen_tokens": gen_tok, "gen_seconds": round(gen_seconds, 2),
                  "tokens_per_s": round(sum(tokens.values()) / gen_seconds, 1) if gen_seconds else None,
                  "raw_shards_written": shards, "examples": _examples(raw)}
        description = (f"{task.description}: queries written by {cfg.synth.generator} (synthetic train / dev"
                       + (", real test)" if real_test else " / test)"))
        manifest.done(spec=spec, synthetic_splits=synthetic_splits, description=description, result=result)
        results[spec] = result
        log.info("queries %s: kept %d of %d (%.0f%%); dropped %s; splits %s (test: %s)", spec, len(kept), len(raw),
                 100 * len(kept) / len(raw), {k: v for k, v in drops.items() if v}, counts, result["test"])
    return {"tasks": results, "seconds": round(time.perf_counter() - t0, 2), "fingerprint": combine([fps[t] for t in sorted(fps)])}


def summary_table(counts: dict[str, Any]) -> str:
    """The end-of-stage summary: per task and kind, generated and kept; drops by filter; splits."""
    from stm_ray.tables import format_table

    lines = []
    for spec, r in (counts.get("tasks") or {}).items():
        rows = [{"kind": k, "generated": v["generated"], "kept": v["kept"],
                 "yield": f"{v['kept'] / v['generated']:.0%}" if v["generated"] else "-"}
                for k, v in r["by_kind"].items()]
        rows.append({"kind": "all", "generated": r["generated"], "kept": r["kept"], "yield": f"{r['yield']:.0%}"})
        lines.append(f"{spec}: {r['documents_sampled']} of {r['documents']} documents sampled")
        lines.append(format_table(rows, ["kind", "generated", "kept", "yield"]))
        lines.append("dropped: " + (", ".join(f"{k} {v}" for k, v in r["drops"].items() if v) or "none"))
        s = r["splits"]
        lines.append(f"splits (queries): train {s['train']} (synthetic), dev {s['dev']} (synthetic), test {s['test']} "
                     f"({r['test']})")
        if r.get("tokens_per_s"):
            lines.append(f"generation: {r['gen_tokens']} tokens, {r['tokens_per_s']} tokens/s (all tasks)")
    return "\n".join(lines)
