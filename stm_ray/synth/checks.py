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
