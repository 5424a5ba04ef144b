"""The embedded default task: ICD-10-CM clinical coding, built from the CDC release that `simple-icd-10-cm` ships.

Documents are diagnosis codes with their descriptions (``"A00.0 Cholera due to Vibrio cholerae 01, biovar
cholerae"``). Queries are the inclusion terms (synonyms, lay and older names) listed under a code; a query's
relevant documents are the codes that list it. Notes that are cross-references rather than names ("Conditions
classifiable to D07", "Categories B90-B94 are to be used ...") are dropped. The split is by query text, hashed,
so it is deterministic and no query is in two splits: 80% train, 10% dev, 10% test.

Every row carries ``chapter`` (1-22) and ``area`` (the chapter's title) so experts can be split by clinical area.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from stm_ray.data.task import DataError, RetrievalTask, stable_fraction

SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}
_SALT = "icd10-cm-split-v1"
_CODE_REF = re.compile(r"\b[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?\b(-[A-Z]?[0-9]*)?")
_NOT_A_NAME = re.compile(r"classifiable|categor(y|ies)\b|\bcodes?\b|\bsee\b|elsewhere|\bsubcategor", re.I)


def _xml_path() -> Path:
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the icd10 task needs the 'simple-icd-10-cm' package (pip install simple-icd-10-cm)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(data.glob("icd10c-tabular-*.xml"))
    if not files:
        raise DataError(f"{data}: no icd10c-tabular-*.xml in the simple-icd-10-cm package")
    return files[-1]


def is_real_query(note: str) -> bool:
    """Inclusion-term notes that name a condition (not cross-references or coding instructions)."""
    note = note.strip()
    if len(note) < 3 or len(note) > 160:
        return False
    if _CODE_REF.search(note) or _NOT_A_NAME.search(note):
        return False
    return True


def split_of(query_text: str) -> str:
    x = stable_fraction(query_text.lower(), _SALT)
    acc = 0.0
    for name, frac in SPLITS.items():
        acc += frac
        if x < acc:
            return name
    return "test"


def load_icd10(chapters: list[int] | None = None) -> RetrievalTask:
    """Build the ICD-10-CM task; ``chapters`` restricts documents and queries to those chapters."""
    path = _xml_path()
    root = ET.parse(path).getroot()
    doc_ids: list[str] = []
    doc_titles: list[str] = []
    doc_texts: list[str] = []
    doc_chapter: list[int] = []
    doc_area: list[str] = []
    # query text (case-folded) -> (original text, chapter, set of codes)
    queries: dict[str, tuple[str, int, str, set[str]]] = {}
    for ch in root.iter("chapter"):
        number = int(ch.findtext("name"))
        if chapters is not None and number not in chapters:
            continue
        area = re.sub(r"\s*\([A-Z0-9-]+\)\s*$", "", ch.findtext("desc") or "").strip()
        for diag in ch.iter("diag"):
            code = (diag.findtext("name") or "").strip()
            desc = (diag.findtext("desc") or "").strip()
            if not code or not desc:
                continue
            doc_ids.append(code)
            doc_titles.append(code)
            doc_texts.append(desc)
            doc_chapter.append(number)
            doc_area.append(area)
            inc = diag.find("inclusionTerm")
            if inc is None:
                continue
            for note in inc.findall("note"):
                text = " ".join((note.text or "").split())
                if not is_real_query(text) or text.lower() == desc.lower():
                    continue
                key = text.lower()
                if key not in queries:
                    queries[key] = (text, number, area, set())
                queries[key][3].add(code)
    if not doc_ids:
        raise DataError(f"{path}: no diagnosis codes found" + (f" in chapters {chapters}" if chapters else ""))
    keys = sorted(queries)
    qids = ["icd-q" + hashlib.sha1(k.encode()).hexdigest()[:12] for k in keys]
    qrels: dict[str, dict[str, list]] = defaultdict(lambda: {"query-id": [], "corpus-id": [], "score": []})
    qsplit = []
    for qid, k in zip(qids, keys):
        s = split_of(k)
        qsplit.append(s)
        for code in sorted(queries[k][3]):
            qrels[s]["query-id"].append(qid)
            qrels[s]["corpus-id"].append(code)
            qrels[s]["score"].append(1)
    corpus = pa.table({"_id": doc_ids, "title": doc_titles, "text": doc_texts,
                       "chapter": pa.array(doc_chapter, pa.int8()), "area": doc_area})
    qtable = pa.table({"_id": qids, "text": [queries[k][0] for k in keys],
                       "chapter": pa.array([queries[k][1] for k in keys], pa.int8()),
                       "area": [queries[k][2] for k in keys], "split": qsplit})
    qrel_tables = {s: pa.table({"query-id": qrels[s]["query-id"], "corpus-id": qrels[s]["corpus-id"],
                                "score": pa.array(qrels[s]["score"], pa.int32())}) for s in SPLITS if s in qrels}
    name = "icd10" if chapters is None else "icd10:" + ",".join(str(c) for c in sorted(chapters))
    return RetrievalTask(name, corpus, qtable, qrel_tables,
                         description="ICD-10-CM clinical coding: inclusion terms -> diagnosis codes (CDC release, via simple-icd-10-cm)")
