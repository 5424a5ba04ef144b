"""Prompts the generator LLM gets: STM's hard-negative prompt and the instruction-pool prompt.

Both are chat messages (the engine applies the generator's own chat template). The fixed text comes first and the
row's fields last, so every prompt of a run shares a long prefix that vLLM's prefix cache computes once.
"""

from __future__ import annotations

import re

NEGATIVE_SYSTEM = (
    "You write hard negative passages for training retrieval models. A hard negative looks relevant to a search "
    "query but does not answer it."
)
NEGATIVE_RULES = (
    "Write ONE new passage for the search task below. The passage must:\n"
    "- be in the same domain as the relevant passage and use similar terminology;\n"
    "- NOT answer the query and NOT be relevant to it;\n"
    "- be realistic, with the style and length of the relevant passage;\n"
    "- be harder than the existing hard negative, but not a near-duplicate of the relevant passage.\n"
    "Reply with the passage text only: no title, no label, no explanation."
)

INSTRUCTION_SYSTEM = "You write task instructions for retrieval models."
INSTRUCTION_RULES = (
    "Write ONE instruction, a single sentence of at most 25 words, that tells a retrieval model what to find for a "
    "search query in the task below. Start with a verb such as 'Given' or 'Retrieve'. Reply with the instruction "
    "only."
)


def negative_messages(query: str, instruction: str, positive: str, negative: str | None) -> list[dict[str, str]]:
    """STM: (query, instruction, positive, a mined negative) -> one new, harder negative."""
    parts = [NEGATIVE_RULES, "", f"Task: {instruction}", f"Query: {query}", f"Relevant passage: {positive}"]
    if negative:
        parts.append(f"Existing hard negative: {negative}")
    parts.append("New hard negative passage:")
    return [{"role": "system", "content": NEGATIVE_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def instruction_messages(description: str, examples: list[str]) -> list[dict[str, str]]:
    """STM's generic prompts: one retrieval instruction for a task description and a few example queries."""
    ex = "\n".join(f"- {q}" for q in examples[:3])
    user = f"{INSTRUCTION_RULES}\n\nTask: {description}\nExample queries:\n{ex}\nInstruction:"
    return [{"role": "system", "content": INSTRUCTION_SYSTEM}, {"role": "user", "content": user}]


_INSTR_LABEL = re.compile(r"^((instruction|question|answer|task)\s*:\s*)+", re.I)
_INSTR_VERBS = frozenset("given retrieve find identify search locate match return select rank fetch look "
                         "determine map".split())


def clean_instruction(text: str) -> str | None:
    """One generated instruction -> a clean single sentence, or None when it is not usable: it must start the way
    the prompt asks (``Given ...`` or an imperative retrieval verb) and be 4-40 words; echoed examples are cut."""
    line = next((ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()), "")
    line = _INSTR_LABEL.sub("", line).strip().strip('"\'“”').strip()
    line = re.split(r"\s*(example quer(y|ies)\s*:|query\s*:)", line, maxsplit=1, flags=re.I)[0].strip()
    line = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]
    words = line.split()
    if not (4 <= len(words) <= 40) or words[0].lower().strip(",:") not in _INSTR_VERBS:
        return None
    return line.rstrip(".:;")


# --- query synthesis (docs: tasks) --------------------------------------------------------------------------------

QUERY_SYSTEM = ("You write search queries that real users would type to find a given document. Reply with the query "
                "only: no quotes, no label, no explanation.")
_QUERY_TAIL = "\n\n{examples}Document:\n{document}\n\nQuery:"
QUERY_PROMPTS: dict[str, str] = {
    "keyword": "Write a short keyword query (2 to 6 words) that someone would type into a search engine to find the "
               "document below. Do not copy a whole sentence from it." + _QUERY_TAIL,
    "question": "Write one natural question that the document below answers. Use your own words; do not copy a "
                "sentence from it." + _QUERY_TAIL,
    "lay": "Write one question about the topic of the document below the way a patient or a non-specialist would "
           "ask it, in everyday words without technical terms." + _QUERY_TAIL,
    "reasoning": "Write one longer search request (one or two sentences) describing a situation or need for which "
                 "the document below is the answer, without naming its main terms directly, so that finding it "
                 "takes some reasoning." + _QUERY_TAIL,
}


def query_messages(template: str, document: str, examples: list[str]) -> list[dict[str, str]]:
    """One query-writing prompt: the kind's template around the document, with few-shot example queries when the
    user gave some. The document comes last, so prompts of one kind share their prefix."""
    ex = ("Examples of real queries (match their style, not their topic):\n" +
          "\n".join(f"- {q}" for q in examples[:5]) + "\n\n") if examples else ""
    user = template.replace("{examples}", ex).replace("{document}", document)
    if "{examples}" not in template and ex:
        user = ex + user
    return [{"role": "system", "content": QUERY_SYSTEM}, {"role": "user", "content": user}]
