"""BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) into Arrow tables, validated line by line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from stm_ray.data.task import DataError, DataProblem, DataReport, RetrievalTask, stable_fraction

log = logging.getLogger(__name__)


def _lines(path: Path, report: DataReport, strict: bool) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line), skipping (and reporting) lines that are not UTF-8."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add(DataProblem(str(path), n, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"), strict)
                continue
            if n == 1:
                line = line.lstrip("\ufeff")
            if line.strip():
                yield n, line


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def read_jsonl(path: Path, kind: str, report: DataReport, strict: bool = False) -> pa.Table:
    """Read a BEIR corpus (``kind='corpus'``) or queries file; bad rows are reported and skipped (fatal if strict)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (a BEIR folder has corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in _lines(path, report, strict):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.add(DataProblem(str(path), n, None, f"malformed JSON: {e.msg} (column {e.colno})"), strict)
            continue
        if not isinstance(row, dict):
            report.add(DataProblem(str(path), n, None, f"malformed JSON: expected an object, got {type(row).__name__}"), strict)
            continue
        if "_id" not in row:
            report.add(DataProblem(str(path), n, "_id", "missing"), strict)
            continue
        rid = _as_str(row["_id"])
        if rid is None or not rid:
            report.add(DataProblem(str(path), n, "_id", f"must be a non-empty string, got {row['_id']!r}"), strict)
            continue
        if rid in first_line:
            report.add(DataProblem(str(path), n, "_id", f"duplicate id {rid!r} (first on line {first_line[rid]})"), strict)
            continue
        text = row.get("text")
        if not isinstance(text, str):
            report.add(DataProblem(str(path), n, "text", "missing" if text is None else f"must be a string, got {type(text).__name__}"), strict)
            continue
        title = row.get("title") or ""
        if not isinstance(title, str):
            report.add(DataProblem(str(path), n, "title", f"must be a string, got {type(title).__name__}"), strict)
            continue
        first_line[rid] = n
        ids.append(rid)
        titles.append(title)
        texts.append(text)
    if not ids:
        raise DataError(f"{path}: no valid rows" + (f" ({len(report.problems)} problems, first: {report.problems[0]})" if report.problems else ""))
    if kind == "corpus":
        return pa.table({"_id": ids, "title": titles, "text": texts})
    return pa.table({"_id": ids, "text": texts})


def read_qrels(path: Path, corpus_ids: set[str], query_ids: set[str], report: DataReport, strict: bool = False) -> pa.Table:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score``, optional header); unknown ids are counted and skipped."""
    qs: list[str] = []
    ds: list[str] = []
    ss: list[int] = []
    for n, line in _lines(path, report, strict):
        parts = line.rstrip("\r\n").split("\t")
        if n == 1 and parts and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) == 4:  # TREC style: qid 0 docid score
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            report.add(DataProblem(str(path), n, None, f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}"), strict)
            continue
        q, d, s = (p.strip() for p in parts)
        try:
            score = int(float(s))
        except ValueError:
            report.add(DataProblem(str(path), n, "score", f"not a number: {s!r}"), strict)
            continue
        if q not in query_ids:
            report.add(DataProblem(str(path), n, "query-id", f"unknown id {q!r} (not in queries.jsonl)"), strict)
            continue
        if d not in corpus_ids:
            report.add(DataProblem(str(path), n, "corpus-id", f"unknown id {d!r} (not in corpus.jsonl)"), strict)
            continue
        qs.append(q)
        ds.append(d)
        ss.append(score)
    return pa.table({"query-id": qs, "corpus-id": ds, "score": pa.array(ss, pa.int32())})


DEV_HOLDOUT = 0.1


def holdout_dev(train: pa.Table, fraction: float = DEV_HOLDOUT) -> tuple[pa.Table, pa.Table]:
    """Split train qrels by query: a fixed ``fraction`` of the queries (by a hash of the id) becomes dev, so the
    searches of a task without a dev split never score on test, and training never sees a dev query."""
    import pyarrow.compute as pc

    dev_mask = pa.array([stable_fraction(q, "dev-holdout") < fraction for q in train.column("query-id").to_pylist()],
                        pa.bool_())
    return train.filter(pc.invert(dev_mask)), train.filter(dev_mask)


def load_beir(folder: str | Path, strict: bool = False, name: str | None = None) -> RetrievalTask:
    """Load a BEIR folder. Every problem names file, line and field; see :class:`DataReport`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (beir:DIR needs a BEIR folder with corpus.jsonl, queries.jsonl, qrels/)")
    report = DataReport()
    corpus = read_jsonl(folder / "corpus.jsonl", "corpus", report, strict)
    queries = read_jsonl(folder / "queries.jsonl", "queries", report, strict)
    qdir = folder / "qrels"
    files = sorted(qdir.glob("*.tsv")) if qdir.is_dir() else []
    if not files:
        raise DataError(f"{qdir}: no qrels/<split>.tsv files")
    cids = set(corpus.column("_id").to_pylist())
    qids = set(queries.column("_id").to_pylist())
    qrels = {f.stem: read_qrels(f, cids, qids, report, strict) for f in files}
    description = f"BEIR folder {folder.name}"
    if "dev" not in qrels and "train" in qrels:
        qrels["train"], qrels["dev"] = holdout_dev(qrels["train"])
        log.info("%s: no qrels/dev.tsv; %d of the train queries (%.0f%%, fixed by query id) are held out as the dev "
                 "split and left out of train", folder, len(set(qrels["dev"].column("query-id").to_pylist())),
                 100 * DEV_HOLDOUT)
        description += f" (dev = {DEV_HOLDOUT:.0%} of train held out)"
    task = RetrievalTask(name or folder.name, corpus, queries, qrels, description=description, report=report)
    report.log(task.name)
    return task
