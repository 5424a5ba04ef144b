"""A bare corpus (``docs:SOURCE``): documents without queries, for query synthesis.

Sources:

* a JSONL file (a BEIR ``corpus.jsonl``, or any rows with ``_id`` or ``id``, ``text`` and an optional ``title``);
* a Parquet file with the same columns;
* a folder holding ``corpus.jsonl`` (a BEIR folder; its queries and qrels, if any, are ignored);
* a folder of ``.txt`` / ``.md`` files (recursively): each file is one document, or several passages of
  ``passage_words`` words overlapping by ``passage_overlap`` words when it is longer. Ids are the file's path
  relative to the folder (``notes/a.md``), with ``#N`` for its N-th passage when it is split, so they are stable
  across runs for the same files and settings;
* another task spec (``docs:icd10:9,10``, ``docs:beir:DIR``, ``docs:mteb:Name``): that task's corpus. Its test
  split (queries and qrels) is kept when it has one, so the synthetic-query loop can be scored on real queries;
  its train and dev queries are dropped.

Rows are validated like BEIR folders: a bad row is reported as ``file:line: field 'x': reason`` and skipped (fatal
with ``data.strict``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa

from stm_ray.data.task import DataError, DataProblem, DataReport, RetrievalTask
from stm_ray.records import read_record

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
NESTED_KINDS = ("icd10", "beir", "mteb")
DEFAULT_PASSAGE_WORDS = 200
DEFAULT_PASSAGE_OVERLAP = 40


def split_passages(text: str, words: int = DEFAULT_PASSAGE_WORDS, overlap: int = DEFAULT_PASSAGE_OVERLAP) -> list[str]:
    """``text`` as passages of at most ``words`` words, each starting ``words - overlap`` words after the last; a
    text that fits is one passage. Whitespace inside a passage is kept as one space per break."""
    if overlap >= words:
        raise DataError(f"passage overlap ({overlap}) must be smaller than the passage size ({words} words)")
    toks = text.split()
    if len(toks) <= words:
        return [" ".join(toks)] if toks else []
    step = words - overlap
    out = []
    for start in range(0, len(toks), step):
        out.append(" ".join(toks[start:start + words]))
        if start + words >= len(toks):
            break
    return out


def _title_and_body(path: Path, text: str) -> tuple[str, str]:
    """A Markdown file's first heading is its title; otherwise the file name (without suffix)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            m = re.match(r"^#{1,6}\s+(.*)$", line.strip())
            if m and path.suffix != ".txt":
                return m.group(1).strip(), "\n".join(lines[i + 1:])
            break
    return path.stem.replace("_", " ").replace("-", " "), text


def _read_text_folder(folder: Path, report: DataReport, strict: bool, words: int, overlap: int) -> pa.Table:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no corpus.jsonl and no .txt / .md files (docs:DIR needs one of them)")
    ids, titles, texts = [], [], []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        try:
            raw = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            report.add(DataProblem(str(f), None, None, f"not valid UTF-8 (byte {e.start})"), strict)
            continue
        title, body = _title_and_body(f, raw.lstrip("\ufeff"))
        passages = split_passages(body, words, overlap)
        if not passages:
            report.add(DataProblem(str(f), None, "text", "empty file (no words)"), strict)
            continue
        for i, p in enumerate(passages):
            ids.append(rel if len(passages) == 1 else f"{rel}#{i}")
            titles.append(title)
            texts.append(p)
    if not ids:
        raise DataError(f"{folder}: no usable text files ({len(report.problems)} problems, first: "
                        f"{report.problems[0] if report.problems else '-'})")
    return pa.table({"_id": ids, "title": titles, "text": texts})


def _row(path: Path, n: int, row: object, report: DataReport, strict: bool, seen: dict[str, int]) -> tuple | None:
    """(id, title, text) of one corpus row, or None (reported)."""
    if not isinstance(row, dict):
        report.add(DataProblem(str(path), n, None, f"expected an object, got {type(row).__name__}"), strict)
        return None
    key = "_id" if "_id" in row else "id" if "id" in row else None
    if key is None:
        report.add(DataProblem(str(path), n, "_id", "missing (a row needs '_id' or 'id')"), strict)
        return None
    rid = row[key]
    rid = str(rid) if isinstance(rid, (int, float)) and not isinstance(rid, bool) else rid
    if not isinstance(rid, str) or not rid:
        report.add(DataProblem(str(path), n, key, f"must be a non-empty string, got {row[key]!r}"), strict)
        return None
    if rid in seen:
        report.add(DataProblem(str(path), n, key, f"duplicate id {rid!r} (first on line {seen[rid]})"), strict)
        return None
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        report.add(DataProblem(str(path), n, "text", "missing" if text is None else
                               "empty" if isinstance(text, str) else f"must be a string, got {type(text).__name__}"),
                   strict)
        return None
    title = row.get("title") or ""
    if not isinstance(title, str):
        report.add(DataProblem(str(path), n, "title", f"must be a string, got {type(title).__name__}"), strict)
        return None
    seen[rid] = n
    return rid, title, text


def _read_rows(path: Path, report: DataReport, strict: bool) -> pa.Table:
    rows: list[tuple] = []
    seen: dict[str, int] = {}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for n, row in enumerate(table.to_pylist(), start=1):  # "line" = row number, 1-based
            r = _row(path, n, row, report, strict, seen)
            if r:
                rows.append(r)
    else:
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8").lstrip("\ufeff") if n == 1 else raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.add(DataProblem(str(path), n, None, f"not valid UTF-8 (byte {e.start})"), strict)
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    report.add(DataProblem(str(path), n, None, f"malformed JSON: {e.msg} (column {e.colno})"), strict)
                    continue
                r = _row(path, n, obj, report, strict, seen)
                if r:
                    rows.append(r)
    if not rows:
        raise DataError(f"{path}: no valid rows" + (f" ({len(report.problems)} problems, first: "
                                                    f"{report.problems[0]})" if report.problems else ""))
    return pa.table({"_id": [r[0] for r in rows], "title": [r[1] for r in rows], "text": [r[2] for r in rows]})


def load_docs(source: str, *, strict: bool = False, passage_words: int = DEFAULT_PASSAGE_WORDS,
              passage_overlap: int = DEFAULT_PASSAGE_OVERLAP) -> RetrievalTask:
    """The corpus of ``docs:SOURCE`` as a task without train/dev queries (see the module docstring)."""
    name = f"docs:{source}"
    kind = source.partition(":")[0]
    if kind in NESTED_KINDS:
        from stm_ray.data.registry import load_task

        inner = load_task(source, strict=strict)
        qrels = {}
        if "test" in inner.qrels:
            qrels["test"] = inner.qrels["test"]
        test_ids = set(qrels["test"].column("query-id").to_pylist()) if qrels else set()
        import pyarrow.compute as pc

        queries = inner.queries.filter(pc.is_in(inner.queries.column("_id"), pa.array(sorted(test_ids), pa.string())))
        return RetrievalTask(name, inner.corpus, queries, qrels, description=inner.description, report=inner.report)
    path = Path(source).expanduser()
    report = DataReport()
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            corpus = _read_rows(path / "corpus.jsonl", report, strict)
        else:
            corpus = _read_text_folder(path, report, strict, passage_words, passage_overlap)
    elif path.is_file():
        if path.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"{path}: docs:FILE reads .jsonl or .parquet (id + text + optional title); for text files "
                            "give their folder")
        corpus = _read_rows(path, report, strict)
    else:
        raise DataError(f"{path}: not found (docs:SOURCE is a .jsonl / .parquet file, a folder of .txt / .md files, a "
                        "folder with corpus.jsonl, or a task spec such as docs:icd10:9,10)")
    task = RetrievalTask(name, corpus, pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                         {}, description=f"documents of {path.name}", report=report)
    report.log(name)
    return task


# --- the synthetic task the queries stage writes for a docs: spec -------------------------------------------------

QUERIES_DIR = "queries"
SYNTH_MANIFEST = "manifest.json"


def folder_name(spec: str) -> str:
    """The folder of a ``docs:`` task under ``<run_dir>/queries/`` (``docs:/data/notes`` -> ``docs-notes``)."""
    source = spec.removeprefix("docs:")
    kind, _, arg = source.partition(":")
    if kind in NESTED_KINDS:
        tail = kind + ("-" + (Path(arg.rstrip("/")).name if kind == "beir" else arg) if arg else "")
    else:
        tail = Path(source.rstrip("/")).name
    return "docs-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-._") or "corpus")


def synthetic_folder(run_dir: str | Path, spec: str) -> Path:
    """This node's copy of the folder (fetched from the store when the run is on object storage)."""
    from stm_ray.storage import RunStore

    return RunStore(str(run_dir)).fetch(f"{QUERIES_DIR}/{folder_name(spec)}")


def synthetic_record(run_dir: str | Path, spec: str, folder: Path | None = None) -> dict | None:
    """The queries stage's manifest for ``spec`` when it finished, else None (``folder``: already fetched)."""
    rec = read_record((folder or synthetic_folder(run_dir, spec)) / SYNTH_MANIFEST, kind="queries manifest")
    return rec if rec is not None and rec.get("status") == "done" else None


def load_synthetic(run_dir: str | Path, spec: str, strict: bool = False) -> RetrievalTask:
    """The task a finished queries stage wrote for ``spec``: the corpus, the kept synthetic queries as train / dev
    (/ test) and, where the source had one, its real test split; splits made of synthetic queries are listed in
    ``task.synthetic_splits``."""
    from stm_ray.data.beir import load_beir

    folder = synthetic_folder(run_dir, spec)
    rec = synthetic_record(run_dir, spec, folder)
    if rec is None:
        raise DataError(f"{spec}: no synthetic queries yet in {folder} (a docs: task gets "
                        "its queries from the queries stage: stm-ray run, or stm-ray queries CONFIG)")
    task = load_beir(folder, strict=strict, name=spec)
    task.synthetic_splits = tuple(rec.get("synthetic_splits") or ())
    task.description = rec.get("description") or task.description
    return task
