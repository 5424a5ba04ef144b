"""Training shards: the parquet rows Synthesize writes and Train reads.

One row per (query, positive) pair::

    query_id, query, positive_id, positive      the judged pair
    negatives           list<string>            hard negatives (mined and/or LLM-written)
    negative_sources    list<string>            one of NEGATIVE_SOURCES per negative, same length
    instruction         string                  the query instruction the row was made with ("" = none)
    task                string                  task spec the pair comes from (same-task batches, dev evaluation)
    expert              string                  expert tag: which LoRA expert trains on the row
    positive_score      double (null)           teacher score of the positive (schema 2; the ``teacher`` stage)
    negative_scores     list<double> (null)     teacher score per negative, same length as negatives (schema 2)

Schema 1 shards (no score columns) still load: their rows get null scores and train on InfoNCE alone.

Shards are written atomically (temp name, then rename), so a reader never sees half a shard and files whose name
starts with a dot are in-flight temporaries, never read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stm_ray.data.task import DataError, DataProblem, DataReport
from stm_ray.utils import atomic_write_bytes

NEGATIVE_SOURCES = ("mined-bm25", "mined-dense", "synthetic")

SHARD_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("positive_id", pa.string()),
    ("positive", pa.string()),
    ("negatives", pa.list_(pa.string())),
    ("negative_sources", pa.list_(pa.string())),
    ("instruction", pa.string()),
    ("task", pa.string()),
    ("expert", pa.string()),
    ("positive_score", pa.float64()),
    ("negative_scores", pa.list_(pa.float64())),
])
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)
SCHEMA_VERSION = 2
SCORE_COLUMNS = ("positive_score", "negative_scores")  # optional: added by schema 2
REQUIRED_COLUMNS = tuple(c for c in SHARD_COLUMNS if c not in SCORE_COLUMNS)
VERSION_KEY = b"stm_ray.schema_version"


STATS_KEY = b"stm_ray.stats"


def write_shard(table: pa.Table, path: str | os.PathLike, stats: dict | None = None) -> Path:
    """Write one parquet shard with the shard schema, atomically. ``stats`` (JSON) travel in the file's metadata,
    so a shard and the counts that describe it are written (or lost) together."""
    table = with_score_columns(table).select(list(SHARD_COLUMNS)).cast(SHARD_SCHEMA)
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode()}
    if stats is not None:
        meta[STATS_KEY] = json.dumps(stats).encode()
    table = table.replace_schema_metadata(meta)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return atomic_write_bytes(path, buf.getvalue().to_pybytes())


def with_score_columns(table: pa.Table) -> pa.Table:
    """``table`` with null score columns added where it has none (a schema 1 shard, or rows before scoring)."""
    for name in SCORE_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SHARD_SCHEMA.field(name).type))
    return table


def shard_stats(path: str | os.PathLike) -> dict:
    """The stats a shard was written with ({} when none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[STATS_KEY]) if STATS_KEY in meta else {}


def shard_files(source: str | os.PathLike) -> list[Path]:
    """Parquet files of a shard folder (recursively, sorted), or the single file given; temporaries skipped."""
    src = Path(source)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{src}: no such shard folder or file (run `stm-ray synthesize` first, or set train.shards)")
    files = sorted(p for p in src.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not files:
        raise DataError(f"{src}: no parquet shards found")
    return files


def _row_problem(row: dict, sources_known: set[str]) -> tuple[str, str] | None:
    for col in ("query", "positive"):
        if not (row.get(col) or "").strip():
            return col, "empty"
    negs, srcs = row.get("negatives") or [], row.get("negative_sources") or []
    if len(negs) != len(srcs):
        return "negative_sources", f"length {len(srcs)} differs from negatives ({len(negs)})"
    bad = [s for s in srcs if s not in sources_known]
    if bad:
        return "negative_sources", f"unknown source {bad[0]!r} (known: {', '.join(sorted(sources_known))})"
    if not (row.get("expert") or "").strip():
        return "expert", "empty"
    scores = row.get("negative_scores")
    if scores is not None and len(scores) != len(negs):
        return "negative_scores", f"length {len(scores)} differs from negatives ({len(negs)})"
    pos = row.get("positive_score")
    if pos is not None and math.isnan(pos):
        return "positive_score", "NaN"
    if scores and any(x is None or math.isnan(x) for x in scores):
        return "negative_scores", "NaN or null entry"
    return None


def read_shards(source: str | os.PathLike, *, strict: bool = False,
                report: DataReport | None = None) -> pa.Table:
    """Read and validate shards into one Arrow table with the shard schema.

    A missing column is an error naming the file (the score columns are optional: schema 1 shards get nulls). A
    bad row (empty query or positive, negatives and sources of
    different lengths, an unknown source, no expert tag) names ``file:row: field``; it is skipped and counted in
    ``report`` unless ``strict``.
    """
    report = report if report is not None else DataReport()
    known = set(NEGATIVE_SOURCES)
    tables = []
    for f in shard_files(source):
        try:
            t = pq.read_table(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise DataError(f"{f}: not a readable parquet file ({e})") from e
        missing = [c for c in REQUIRED_COLUMNS if c not in t.column_names]
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(missing)}; a shard needs {', '.join(REQUIRED_COLUMNS)}")
        t = with_score_columns(t).select(list(SHARD_COLUMNS)).cast(SHARD_SCHEMA)
        keep = []
        for i, row in enumerate(t.to_pylist()):
            problem = _row_problem(row, known)
            if problem is None:
                keep.append(i)
            else:
                report.add(DataProblem(str(f), i, problem[0], problem[1]), strict)
        tables.append(t.take(keep) if len(keep) < t.num_rows else t)
    report.log(str(source))
    return pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
