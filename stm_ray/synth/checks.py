"""Checks on every LLM-written negative. A failed check drops the text and the row keeps its mined negatives.

Reasons (counted per run): ``empty``, ``too_short``, ``copy_of_positive`` (the positive verbatim, nearly so, or
nearly all of its content words: the generator answered the query), ``copy_of_query``, ``refusal``,
``copy_of_mined`` (the mined negative given in the prompt, nearly verbatim), ``boilerplate`` (chat filler such as
"Sure, here is ...", or the prompt's own labels echoed back), ``engine_error`` (the engine failed on the row).
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

DROP_REASONS = ("empty", "too_short", "copy_of_positive", "copy_of_query", "copy_of_mined", "refusal", "boilerplate",
                "engine_error")

_LABEL = re.compile(r"^\s*(\*\*)?(new\s+)?(hard\s+)?(negative\s+)?(passage|negative|answer|text|output)(\s*\d+)?\s*(\*\*)?\s*:\s*",
                    re.I)
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|sorry\b|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
                      r"i won'?t|as an ai|as a language model|unfortunately, i)", re.I)
_BOILERPLATE = re.compile(r"^(sure\b|certainly\b|of course\b|absolutely\b|okay\b|ok\b|here is\b|here'?s\b|"
                          r"below is\b|great question)|\b(as requested|i hope this helps|let me know if)\b|"
                          r"(existing hard negative|relevant passage|new hard negative passage|example queries)\s*:",
                          re.I)
_WORD = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)?")
_STOP = frozenset("a an and are as at be by for from has have in is it its of on or that the this to was were "
                  "which with not no".split())


def clean_text(text: str | None) -> str:
    """Whitespace, wrapping quotes and a leading label ("Passage:") removed; the text itself is untouched."""
    t = (text or "").strip()
    t = _LABEL.sub("", t, count=1).strip()
    if len(t) >= 2 and t[0] in "\"'“" and t[-1] in "\"'”":
        t = t[1:-1].strip()
    return t


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _content(text: str) -> set[str]:
    return {w for w in _words(text) if w not in _STOP}


def _near(a: str, b: str) -> bool:
    a, b = " ".join(_words(a)), " ".join(_words(b))
    if not a or not b:
        return False
    return a == b or SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.9


def check_negative(text: str | None, query: str, positive: str, *, mined: str | None = None,
                   min_words: int = 4) -> tuple[str, str | None]:
    """(cleaned text, None) when the negative is usable, else (cleaned text, reason)."""
    t = clean_text(text)
    if not t:
        return t, "empty"
    if _REFUSAL.match(t):
        return t, "refusal"
    if _BOILERPLATE.search(t):
        return t, "boilerplate"
    if _near(t, positive):
        return t, "copy_of_positive"
    pos_words = _content(positive)
    if len(pos_words) >= 3 and len(pos_words & _content(t)) >= 0.9 * len(pos_words):
        return t, "copy_of_positive"
    if _near(t, query):
        return t, "copy_of_query"
    if mined and _near(t, mined):
        return t, "copy_of_mined"
    if len(_words(t)) < min_words:
        return t, "too_short"
    return t, None


# --- synthetic queries (docs: tasks) ------------------------------------------------------------------------------

QUERY_LEXICAL_REASONS = ("engine_error", "empty", "refusal", "boilerplate", "too_short", "too_long",
                         "copy_of_document", "duplicate")
_QUERY_LABEL = re.compile(r"^\s*(\*\*)?((search|keyword|natural|lay|long|new)\s+)?(query|question|request|claim|other name)"
                          r"(\s*\d+)?\s*(\*\*)?\s*[:\-]\s*", re.I)


def clean_query(text: str | None) -> str:
    """The first non-empty line of a generation, without a leading label ("Query:"), list marker or wrapping
    quotes."""
    line = next((ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^([-*•]|\d+[.)])\s+", "", line)
    line = _QUERY_LABEL.sub("", line, count=1).strip()
    line = re.sub(r"^document\s*:\s*", "", line, flags=re.I)  # the prompt's label echoed back
    if len(line) >= 2 and line[0] in "\"'“" and line[-1] in "\"'”":
        line = line[1:-1].strip()
    return line


def normalize_query(text: str) -> str:
    """The form duplicates are compared in: lowercase words only."""
    return " ".join(_words(text))


def check_query(text: str | None, document: str, *, min_words: int = 2, max_words: int = 80,
                doc_id: str | None = None) -> tuple[str, str | None]:
    """(cleaned query, None) when a generated query passes the lexical checks, else (cleaned query, reason):
    ``empty``, ``refusal``, ``boilerplate`` (chat filler, or the prompt's labels echoed), ``too_short`` /
    ``too_long`` (word counts), ``copy_of_document`` (the document itself, nearly so, a sentence of it copied:
    eight or more words of the query appear in the document in the same order, or the document's code: an id
    with letters and digits, such as ICD-10's ``I44.39``, named in the query)."""
    q = clean_query(text)
    if not q:
        return q, "empty"
    if _REFUSAL.match(q):
        return q, "refusal"
    if _BOILERPLATE.search(q) or re.search(r"\b(the )?document (below|above)\b|^document\s*:", q, re.I):
        return q, "boilerplate"
    words = _words(q)
    if len(words) < min_words:
        return q, "too_short"
    if len(words) > max_words:
        return q, "too_long"
    doc = " ".join(_words(document))
    if _near(q, document) or (len(words) >= 8 and " ".join(words) in doc):
        return q, "copy_of_document"
    if doc_id and re.search(r"[A-Za-z]", doc_id) and re.search(r"\d", doc_id) and re.search(
            r"(?<![A-Za-z0-9])" + re.escape(doc_id) + r"(?![A-Za-z0-9])", q, re.I):
        return q, "copy_of_document"
    return q, None
