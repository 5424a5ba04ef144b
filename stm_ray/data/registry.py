"""Task registry: a task spec string -> a :class:`RetrievalTask`.

Specs: ``icd10`` (embedded default; ``icd10:1,2`` for chapters 1 and 2), ``beir:DIR`` (a local BEIR folder),
``mteb:TaskName`` (loaded through mteb; needs the Hugging Face hub), ``docs:SOURCE`` (a bare corpus: its queries
come from the queries stage, see :mod:`stm_ray.data.docs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa

from stm_ray.data.beir import load_beir
from stm_ray.data.docs import load_docs, load_synthetic, synthetic_record
from stm_ray.data.icd10 import load_icd10
from stm_ray.data.task import DataError, RetrievalTask

log = logging.getLogger(__name__)


def _icd10(arg: str | None, strict: bool) -> RetrievalTask:
    chapters = None
    if arg:
        try:
            chapters = [int(c) for c in arg.split(",") if c.strip()]
        except ValueError:
            raise DataError(f"icd10:{arg}: chapters must be numbers 1-22, e.g. icd10:1,2") from None
    return load_icd10(chapters)


def _beir(arg: str | None, strict: bool) -> RetrievalTask:
    if not arg:
        raise DataError("beir:DIR needs a folder, e.g. beir:../shared/data/scifact")
    return load_beir(arg, strict=strict)


def _mteb(arg: str | None, strict: bool) -> RetrievalTask:
    if not arg:
        raise DataError("mteb:TaskName needs a task name, e.g. mteb:SciFact")
    import mteb

    try:
        task = mteb.get_task(arg)
    except Exception as e:
        raise DataError(f"mteb:{arg}: mteb does not know this task ({e})") from None
    try:
        task.load_data()
    except Exception as e:
        raise DataError(
            f"mteb:{arg}: mteb could not load the data ({type(e).__name__}: {str(e)[:200]}). mteb downloads tasks from "
            f"the Hugging Face hub; offline, put the task in a local BEIR folder and use beir:DIR instead.") from None
    return _from_mteb(arg, task)


def _from_mteb(name: str, task) -> RetrievalTask:
    ds = task.dataset
    subset = "default" if "default" in ds else next(iter(ds))
    corpus_rows: dict[str, tuple[str, str]] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, pa.Table] = {}
    for split, data in ds[subset].items():
        for row in data["corpus"]:
            corpus_rows[str(row["id"])] = (row.get("title") or "", row.get("text") or "")
        for row in data["queries"]:
            queries[str(row["id"])] = row["text"] if isinstance(row["text"], str) else str(row["text"])
        q, d, s = [], [], []
        for qid, docs in data["relevant_docs"].items():
            for did, score in docs.items():
                q.append(str(qid)), d.append(str(did)), s.append(int(score))
        qrels[split] = pa.table({"query-id": q, "corpus-id": d, "score": pa.array(s, pa.int32())})
    ids = list(corpus_rows)
    corpus = pa.table({"_id": ids, "title": [corpus_rows[i][0] for i in ids], "text": [corpus_rows[i][1] for i in ids]})
    qt = pa.table({"_id": list(queries), "text": list(queries.values())})
    return RetrievalTask(name, corpus, qt, qrels, description=f"mteb task {name}")


def _docs(arg: str | None, strict: bool) -> RetrievalTask:
    if not arg:
        raise DataError("docs:SOURCE needs a corpus: a .jsonl / .parquet file, a folder of .txt / .md files, a folder "
                        "with corpus.jsonl, or a task spec (docs:icd10:9,10)")
    return load_docs(arg, strict=strict)


TASKS: dict[str, Callable[[str | None, bool], RetrievalTask]] = {"icd10": _icd10, "beir": _beir, "mteb": _mteb,
                                                                  "docs": _docs}


def load_task(spec: str, strict: bool = False, run_dir: str | None = None) -> RetrievalTask:
    """Load a task from its spec; an unknown kind lists the valid ones. With ``run_dir``, a ``docs:`` task is the
    one the run's queries stage wrote (synthetic train / dev queries); without, its bare corpus."""
    kind, _, arg = spec.partition(":")
    if kind not in TASKS:
        raise DataError(f"unknown task {spec!r}; valid forms: icd10, icd10:CHAPTERS, beir:DIR, mteb:TaskName, "
                        "docs:SOURCE")
    if kind == "docs" and run_dir is not None:
        return load_synthetic(run_dir, spec, strict=strict)
    return TASKS[kind](arg or None, strict)


def task_fingerprint(spec: str, run_dir: str | None = None) -> str:
    """Identifies a task's data without loading it (an input fingerprint of every stage that reads tasks): a BEIR
    folder or a docs: file or folder by its files' names, sizes and modification times; built-in and mteb tasks by
    their package versions; with ``run_dir``, a docs: task by the fingerprint of the queries its queries stage
    wrote."""
    import hashlib
    from importlib import metadata
    from pathlib import Path

    kind, _, arg = spec.partition(":")
    h = hashlib.sha256(spec.encode())
    if kind == "docs":
        rec = synthetic_record(run_dir, spec) if run_dir is not None else None
        if rec is not None:
            h.update(f"|queries={rec.get('fingerprint')}".encode())
        elif arg.partition(":")[0] in TASKS:
            h.update(task_fingerprint(arg).encode())
        elif arg:
            p = Path(arg).expanduser()
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
            for f in files:
                st = f.stat()
                h.update(f"|{f.name if f == p else f.relative_to(p).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif kind == "beir" and arg and Path(arg).is_dir():
        for f in sorted(p for p in Path(arg).rglob("*") if p.is_file() and p.suffix in (".jsonl", ".tsv", ".json")):
            st = f.stat()
            h.update(f"|{f.relative_to(arg).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        package = {"icd10": "simple-icd-10-cm", "mteb": "mteb"}.get(kind)
        try:
            h.update(f"|{package}={metadata.version(package)}".encode() if package else b"")
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]
