"""The in-memory form of a retrieval task: Arrow tables for corpus, queries and per-split qrels."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

log = logging.getLogger(__name__)

CORPUS_COLUMNS = ("_id", "title", "text")
QUERY_COLUMNS = ("_id", "text")
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and field."""


@dataclass
class DataProblem:
    file: str
    line: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        return f"{where}: " + (f"field '{self.field}': " if self.field else "") + self.reason


@dataclass
class DataReport:
    """Problems found while loading: counted, reported, fatal only in strict mode."""

    problems: list[DataProblem] = field(default_factory=list)

    def add(self, problem: DataProblem, strict: bool) -> None:
        if strict:
            raise DataError(str(problem) + " (strict mode)")
        self.problems.append(problem)

    def counts(self) -> dict[str, int]:
        """Problems by kind: the field and the reason up to its first detail ("corpus-id: unknown id": 3)."""
        out: dict[str, int] = defaultdict(int)
        for p in self.problems:
            kind = re.split(r"[:('(]", p.reason, maxsplit=1)[0].strip()
            out[f"{p.field}: {kind}" if p.field else kind] += 1
        return dict(out)

    def log(self, name: str, limit: int = 10) -> None:
        if not self.problems:
            return
        log.warning("%s: %d problem(s) in the input, rows skipped (data.strict=true makes them fatal): %s",
                    name, len(self.problems), self.counts())
        for p in self.problems[:limit]:
            log.warning("  %s", p)
        if len(self.problems) > limit:
            log.warning("  ... and %d more", len(self.problems) - limit)


@dataclass
class RetrievalSplit:
    """One split, ready to search: parallel id/text lists and graded relevance ``{qid: {docid: score}}``."""

    task: str
    split: str
    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    corpus: list[str]
    relevant: dict[str, dict[str, int]]

    def __len__(self) -> int:
        return len(self.query_ids)


def doc_text(title: str | None, text: str | None) -> str:
    """Title and body joined as BEIR and mteb do for exact search: ``title + " " + text``, stripped."""
    return f"{title or ''} {text or ''}".strip()


def stable_fraction(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) from a string: stable across processes and Python versions."""
    h = hashlib.sha1(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass
class RetrievalTask:
    """A retrieval task as Arrow tables.

    ``corpus`` has columns ``_id``, ``title``, ``text`` (plus task-specific ones, e.g. ``chapter``);
    ``queries`` has ``_id``, ``text`` (plus extras); ``qrels`` maps a split name to a table with
    ``query-id``, ``corpus-id``, ``score``.
    """

    name: str
    corpus: pa.Table
    queries: pa.Table
    qrels: dict[str, pa.Table]
    description: str = ""
    report: DataReport = field(default_factory=DataReport)
    synthetic_splits: tuple[str, ...] = ()  # splits whose queries an LLM wrote (docs: tasks): marked where printed

    @property
    def splits(self) -> list[str]:
        return list(self.qrels)

    def qrels_dict(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.qrels:
            raise DataError(f"task {self.name!r} has no split {split!r}; it has: {', '.join(self.splits) or 'none'}")
        out: dict[str, dict[str, int]] = defaultdict(dict)
        t = self.qrels[split]
        for q, d, s in zip(t.column("query-id").to_pylist(), t.column("corpus-id").to_pylist(),
                           t.column("score").to_pylist()):
            out[q][d] = int(s)
        return dict(out)

    def split(self, split: str, max_queries: int | None = None, seed: int = 13) -> RetrievalSplit:
        """Queries of ``split`` that have at least one relevant document, optionally a deterministic subsample."""
        rel = self.qrels_dict(split)
        rel = {q: docs for q, docs in rel.items() if any(s > 0 for s in docs.values())}
        qtext = dict(zip(self.queries.column("_id").to_pylist(), self.queries.column("text").to_pylist()))
        qids = [q for q in rel if q in qtext]
        if max_queries is not None and len(qids) > max_queries:
            qids = sorted(qids, key=lambda q: stable_fraction(q, f"sample{seed}"))[:max_queries]
            qids.sort()
        rel = {q: rel[q] for q in qids}
        return RetrievalSplit(self.name, split, qids, [qtext[q] for q in qids], self.corpus.column("_id").to_pylist(),
                              self.doc_texts(), rel)

    def doc_texts(self) -> list[str]:
        """Every document as searched and embedded: ``title + " " + text`` (:func:`doc_text`), in corpus order."""
        c = self.corpus
        return [doc_text(t, x) for t, x in zip(c.column("title").to_pylist(), c.column("text").to_pylist())]

    def summary(self) -> dict[str, int]:
        out = {"documents": self.corpus.num_rows, "queries": self.queries.num_rows}
        for s, t in self.qrels.items():
            out[f"qrels[{s}]"] = t.num_rows
        return out
