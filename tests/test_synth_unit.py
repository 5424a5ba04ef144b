"""Synthesize without a cluster: the checks on generated negatives, prompts, pair planning, mining per query."""

from __future__ import annotations

import numpy as np
import pytest

from stm_ray.data.instructions import task_instruction
from stm_ray.synth.checks import check_negative, clean_text
from stm_ray.synth.prompts import clean_instruction, negative_messages

Q = "broken thigh bone"
P = "S72.001A Fracture of unspecified part of neck of right femur, initial encounter for closed fracture"


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("Femur.", "too_short"),
    (P, "copy_of_positive"),
    ("S72.001A Fracture of unspecified part of neck of right femur, initial encounter for closed fractures.",
     "copy_of_positive"),
    ("Closed fracture of the neck of right femur S72.001A, unspecified part, initial encounter", "copy_of_positive"),
    ("Broken thigh bone", "copy_of_query"),
    ("I'm sorry, but I can't help with that request.", "refusal"),
    ("As an AI language model, I cannot write medical passages.", "refusal"),
    ("Sure! Here is a passage: S42.001A Fracture of unspecified part of right clavicle", "boilerplate"),
    ("Here's a hard negative: S82.001A Unspecified fracture of right patella", "boilerplate"),
    ("S82.001A Unspecified fracture of right patella, initial encounter for closed fracture", None),
])
def test_check_negative_reasons(text, reason):
    assert check_negative(text, Q, P)[1] == reason


def test_clean_text_strips_labels_and_quotes_only():
    assert clean_text('  Passage: "S82.001A Unspecified fracture of right patella"  ') == \
        "S82.001A Unspecified fracture of right patella"
    assert clean_text("New hard negative passage: text here") == "text here"
    assert clean_text("Passages of the femur") == "Passages of the femur"


def test_prompt_puts_fixed_text_first_and_row_fields_last():
    a = negative_messages("q one", "Find codes", "pos one", "neg one")
    b = negative_messages("q two", "Find codes", "pos two", None)
    assert a[0] == b[0]  # same system message
    ua, ub = a[1]["content"], b[1]["content"]
    assert ua.index("Query: q one") > 300 and ua[:300] == ub[:300]
    assert "Existing hard negative: neg one" in ua and "Existing hard negative" not in ub


def test_instruction_cleaning_and_task_defaults():
    assert clean_instruction('Instruction: "Given a diagnosis, retrieve its ICD-10-CM code."\nextra') == \
        "Given a diagnosis, retrieve its ICD-10-CM code"
    assert clean_instruction("Sure, here is one instruction for you") is None
    assert clean_instruction("Retrieve") is None
    assert clean_instruction("Question: Given a diagnosis name, retrieve its code. Example query: Given x") == \
        "Given a diagnosis name, retrieve its code"
    assert clean_instruction("Delete \"revised\" to make the instruction just") is None
    assert clean_instruction("Hello Detective, I found the ICD-10-CM code for a disorder") is None
    assert task_instruction("icd10", "icd10", None).startswith("Given a diagnosis")
    assert task_instruction("beir:/x/scifact", "scifact", None).startswith("Given a scientific claim")
    assert task_instruction("icd10", "icd10", "Instruct: Find the code\nQuery: ") == "Find the code"


def test_plan_pairs_shards_and_expert_tags(tiny_beir):
    from stm_ray.config import ConfigError, load_config
    from stm_ray.data import load_task
    from stm_ray.synth.negatives import plan_pairs

    task = load_task(f"beir:{tiny_beir}")
    cfg = load_config(None, ["synth.shard_size=3", "data.train_split=test"])
    rows = plan_pairs(task, f"beir:{tiny_beir}", cfg)
    assert [r["shard"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert {r["expert"] for r in rows} == {"beir-tiny"}
    assert rows == plan_pairs(task, f"beir:{tiny_beir}", cfg)  # deterministic
    capped = plan_pairs(task, "t", load_config(None, ["synth.max_rows=5", "data.train_split=test"]))
    assert len(capped) == 5 and {r["key"] for r in capped} <= {r["key"] for r in rows}
    with pytest.raises(ConfigError, match="no query column 'chapter'"):
        plan_pairs(task, "t", load_config(None, ["synth.expert_by=chapter", "data.train_split=test"]))


def test_select_negatives_counts_filtered_candidates_per_query():
    from stm_ray.synth.mine import select_negatives

    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    scores = np.array([[0.99, 0.97, 0.80, 0.70], [0.5, 0.4, 0.3, 0.2]])
    mined = select_negatives(idx, scores, np.array([1.0, 1.0]), [{0}, set()], count=1, margin=0.95)
    assert mined.indices == [[2], [3]]
    assert mined.dropped_per_query == [1, 0] and mined.dropped_as_false_negative == 1


def test_prompt_echo_and_copy_of_mined_are_dropped():
    mined = "Q87.1 Congenital malformation syndromes predominantly associated with short stature"
    echo = f"Existing hard negative: {mined}\nNew hard negative passage:"
    assert check_negative(echo, "short stature", "E34.328 Other genetic causes of short stature",
                          mined=mined)[1] == "boilerplate"
    assert check_negative(mined + ".", "short stature", "E34.328 Other genetic causes of short stature",
                          mined=mined)[1] == "copy_of_mined"


def test_shard_writer_writes_a_row_delivered_twice_once(tmp_path):
    """Work redone after a lost node can deliver a row again: the shard still gets each row once, counted."""
    import pyarrow.parquet as pq

    from stm_ray.synth.negatives import _ShardWriter

    plan = {("t", 0): [{"key": f"k{i}", "llm": False, "query_id": f"q{i}", "query": f"query {i}",
                        "positive_id": f"d{i}", "positive": f"doc {i}", "instruction": None, "task": "t",
                        "expert": "e"} for i in range(3)]}
    w = _ShardWriter(tmp_path, plan, per_row=1, min_words=1, strict=False)
    row = lambda i: {**plan[("t", 0)][i], "shard": 0, "mined_negatives": [f"neg {i}"], "mined_sources": ["bm25"]}  # noqa: E731
    w.add(row(0))
    w.add(row(0))  # again, before the shard is complete
    w.add(row(1))
    assert not w.written
    w.add(row(2))
    w.add(row(2))  # again, after the shard was written
    assert len(w.written) == 1 and w.duplicates == 2
    table = pq.read_table(w.written[0])
    assert table.column("query_id").to_pylist() == ["q0", "q1", "q2"]
