"""Corpus only: docs: task specs, query synthesis (ray.data.llm + vLLM), the filter cascade, synthetic splits, and
the whole loop on docs: tasks alone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import DOCS


def _md_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i, (t, x) in DOCS.items():
        (root / ("sub" if i in ("d7", "d8") else "") / f"{t.replace(' ', '_').lower()}.md").write_text(f"# {t}\n\n{x}\n")
    (root / ".hidden.md").write_text("# not a document\n\nskipped because hidden\n")
    return root


# --- loading a bare corpus --------------------------------------------------------------------------------------

def test_split_passages_covers_every_word_with_overlap():
    from stm_ray.data.docs import split_passages

    words = [f"w{i}" for i in range(450)]
    parts = split_passages(" ".join(words), 200, 40)
    assert [len(p.split()) for p in parts] == [200, 200, 130]
    assert parts[1].split()[0] == "w160" and parts[2].split()[-1] == "w449"
    assert set(" ".join(parts).split()) == set(words)
    assert split_passages("a  b\n c", 200, 40) == ["a b c"] and split_passages("  ", 10, 2) == []


def test_text_folder_documents_passages_stable_ids(tmp_path):
    from stm_ray.data import load_task

    root = _md_folder(tmp_path / "notes")
    (root / "long.txt").write_text(" ".join(f"word{i}" for i in range(450)))
    (root / "empty.md").write_text("   \n")
    t = load_task(f"docs:{root}")
    ids = t.corpus.column("_id").to_pylist()
    assert ids == load_task(f"docs:{root}").corpus.column("_id").to_pylist()  # stable
    assert "asthma.md" in ids and "sub/hypertension.md" in ids and not any("hidden" in i for i in ids)
    assert [i for i in ids if i.startswith("long.txt")] == ["long.txt#0", "long.txt#1", "long.txt#2"]
    row = t.corpus.to_pylist()[ids.index("asthma.md")]
    assert row["title"] == "Asthma" and row["text"].startswith("Asthma is a chronic")  # the heading is the title
    assert t.queries.num_rows == 0 and t.qrels == {}
    assert [str(p) for p in t.report.problems] == [f"{root / 'empty.md'}: field 'text': empty file (no words)"]


def test_jsonl_and_parquet_rows_are_validated_with_file_line_field(tmp_path):
    from stm_ray.data import DataError, load_task

    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join([json.dumps({"id": 1, "text": "first document text"}),
                            json.dumps({"_id": "b", "title": "T", "text": "second"}),
                            "{not json",
                            json.dumps({"id": "c"}),
                            json.dumps({"id": "b", "text": "dup"}),
                            json.dumps({"id": "d", "text": "   "}),
                            json.dumps({"id": "e", "text": "fine", "title": 3})]) + "\n")
    t = load_task(f"docs:{f}")
    assert t.corpus.column("_id").to_pylist() == ["1", "b"]
    got = [str(p) for p in t.report.problems]
    assert got == [f"{f}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
                   f"{f}:4: field 'text': missing", f"{f}:5: field 'id': duplicate id 'b' (first on line 2)",
                   f"{f}:6: field 'text': empty", f"{f}:7: field 'title': must be a string, got int"]
    with pytest.raises(DataError, match=r"docs.jsonl:3: malformed JSON.*strict"):
        load_task(f"docs:{f}", strict=True)
    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": ["x", "y", "x"], "text": ["one doc", "two doc", "again"]}), p)
    t = load_task(f"docs:{p}")
    assert t.corpus.column("_id").to_pylist() == ["x", "y"]
    assert str(t.report.problems[0]) == f"{p}:3: field 'id': duplicate id 'x' (first on line 1)"
    (tmp_path / "docs.csv").write_text("id,text\n1,a\n")
    with pytest.raises(DataError, match="reads .jsonl or .parquet"):
        load_task(f"docs:{tmp_path / 'docs.csv'}")
    with pytest.raises(DataError, match="not found"):
        load_task(f"docs:{tmp_path / 'missing'}")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no corpus.jsonl and no .txt / .md files"):
        load_task(f"docs:{tmp_path / 'nothing'}")


def test_nested_spec_keeps_only_the_real_test_split(tiny_beir):
    from stm_ray.data import load_task

    t = load_task(f"docs:beir:{tiny_beir}")
    assert t.corpus.num_rows == len(DOCS)
    assert list(t.qrels) == ["test"] and t.queries.num_rows == 8
    icd = load_task("docs:icd10:1")
    assert list(icd.qrels) == ["test"] and icd.corpus.num_rows > 100
    assert set(icd.queries.column("_id").to_pylist()) == set(icd.qrels["test"].column("query-id").to_pylist())


def test_docs_fingerprint_follows_the_files(tmp_path):
    from stm_ray.data import task_fingerprint

    root = _md_folder(tmp_path / "notes")
    a = task_fingerprint(f"docs:{root}")
    assert a == task_fingerprint(f"docs:{root}")
    (root / "asthma.md").write_text("# Asthma\n\nchanged text of the asthma note\n")
    assert task_fingerprint(f"docs:{root}") != a


# --- prompts, filters, plans, splits ------------------------------------------------------------------------------

def test_query_checks_name_their_reason():
    from stm_ray.synth.checks import check_query, clean_query

    doc = "Cholera is an acute diarrhoeal infection caused by Vibrio cholerae bacteria in contaminated water."
    assert clean_query('1. Query: "cholera in water"\nmore text') == "cholera in water"
    cases = {"": "empty", "I'm sorry, I cannot help": "refusal", "Sure, here is a query: cholera": "boilerplate",
             "What does the document below describe?": "boilerplate", "cholera": "too_short",
             " ".join(["word"] * 81): "too_long", doc: "copy_of_document",
             "acute diarrhoeal infection caused by Vibrio cholerae bacteria in contaminated water": "copy_of_document",
             "how do people catch cholera": None, "Question: cholera from drinking water?": None}
    for text, reason in cases.items():
        assert check_query(text, doc)[1] == reason, text
    code = "I44.39 Other atrioventricular block"
    assert check_query("what is i44.39 heart block", code, doc_id="I44.39")[1] == "copy_of_document"
    assert check_query("Document: slow heart rhythm block", code, doc_id="I44.39") == ("slow heart rhythm block", None)
    assert check_query("covid 19 vaccine side effects", "text", doc_id="4983")[1] is None  # a number is no code


def test_query_prompts_and_config_validation():
    from stm_ray.config import ConfigError, load_config
    from stm_ray.synth.llm import messages_for
    from stm_ray.synth.prompts import QUERY_PROMPTS

    row = {"kind": "query", "instruction": QUERY_PROMPTS["lay"], "positive": "Asthma is a disease " * 200,
           "examples": ["what is wheezing", "asthma inhaler dose"], "description": "lay"}
    msgs = messages_for(row, 100)
    user = msgs[1]["content"]
    assert msgs[0]["role"] == "system" and "everyday words" in user and user.endswith("Query:")
    assert "- what is wheezing" in user and user.index("Examples") < user.index("Document:")
    assert len(user.split("Document:\n")[1]) < 120  # the document is cut to synth.prompt_max_chars
    from stm_ray.synth.llm import _sampling

    sp = _sampling(load_config(None).synth, {**row, "key": "d\x1f0", "gen": 0}, query_max_tokens=20)
    assert sp["max_tokens"] == 20 and sp["stop"] == ["\n"]  # one line per query
    with pytest.raises(ConfigError, match="unknown kind"):
        load_config(None, ["queries.kinds=[keyword,riddle]"])
    with pytest.raises(ConfigError, match="document"):
        load_config(None, ["queries.kinds=[riddle]", "queries.prompts={riddle: 'Write a riddle'}"])
    cfg = load_config(None, ["queries.kinds=[riddle]", "queries.prompts={riddle: 'Riddle for {document}'}"])
    assert cfg.queries.kinds == ["riddle"]


def test_plan_samples_documents_and_rotates_kinds(tmp_path):
    from stm_ray.config import load_config
    from stm_ray.data import load_task
    from stm_ray.synth.queries import plan_queries, split_documents

    task = load_task("docs:icd10:1")
    cfg = load_config(None, ["queries.max_documents=50", "queries.per_document=4", "queries.shard_size=64"])
    rows = plan_queries(task, "docs:icd10:1", cfg)
    assert len(rows) == 200 and rows == plan_queries(task, "docs:icd10:1", cfg)  # deterministic
    docs = sorted({r["positive_id"] for r in rows})
    assert len(docs) == 50
    for d in docs:  # every document gets each of the four kinds once
        assert sorted(r["description"] for r in rows if r["positive_id"] == d) == sorted(cfg.queries.kinds)
    assert [r["shard"] for r in rows][::64] == [0, 1, 2, 3]
    other = plan_queries(task, "docs:icd10:1", cfg.model_copy(update={"queries": cfg.queries.model_copy(
        update={"seed": 14})}))
    assert {r["positive_id"] for r in other} != set(docs)
    splits = split_documents(docs, cfg, synthetic_test=True)
    assert set(splits.values()) == {"train", "dev", "test"} and sum(v == "train" for v in splits.values()) > 30
    assert "test" not in split_documents(docs, cfg, synthetic_test=False).values()
    assert set(split_documents(docs[:3], cfg, synthetic_test=True).values()) == {"train", "dev", "test"}
    assert list(split_documents(docs[:1], cfg, synthetic_test=True).values()) == ["train"]
    for n in range(2, 12):  # a few documents: train is never empty, dev gets one as soon as train keeps one
        got = list(split_documents(docs[:n], cfg, synthetic_test=True).values())
        assert got.count("train") >= 1 and "dev" in got


def test_queries_stage_needs_docs_tasks(tmp_path, tiny_beir):
    from stm_ray.config import ConfigError, load_config
    from stm_ray.pipeline import run_pipeline

    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.tasks=[beir:{tiny_beir}]"])
    with pytest.raises(ConfigError, match="stage .queries. needs a docs: task"):
        run_pipeline(cfg, stages=["queries"], show_progress=False)


def test_docs_task_without_queries_is_a_clear_error(tmp_path):
    from stm_ray.data import DataError, load_task

    root = _md_folder(tmp_path / "notes")
    with pytest.raises(DataError, match="no synthetic queries yet.*queries stage"):
        load_task(f"docs:{root}", run_dir=str(tmp_path / "run"))


# --- the stage and the loop on a local Ray ------------------------------------------------------------------------

@pytest.mark.slow  # ~3 min; the fast tier runs the queries stage on the real engine in test_cli.py::test_demo_command_runs_the_main_job_and_prints_the_table
@pytest.mark.integration
def test_docs_only_loop_end_to_end(tmp_path, ray_local, tiny_beir, tiny_llama_dir, tiny_bert_dir):
    """Two docs: tasks (a folder of notes: synthetic test; the tiny BEIR corpus: its real test split) through every
    stage: queries (real vLLM generation, the filter cascade), synthesize, train, instructions, merge, evaluate."""
    from stm_ray.config import load_config
    from stm_ray.data import load_task
    from stm_ray.pipeline import run_pipeline
    from stm_ray.synth.queries import DROP_REASONS

    notes = _md_folder(tmp_path / "notes")
    specs = [f"docs:{notes}", f"docs:beir:{tiny_beir}"]
    run = tmp_path / "run"
    over = [f"run_dir={run}", f"data.tasks=[{','.join(specs)}]", f"synth.generator={tiny_llama_dir}",
            f"model.name_or_path={tiny_bert_dir}", "synth.max_model_len=512", "synth.batch_size=8",
            "queries.per_document=3", "queries.max_new_tokens=12", "queries.min_words=1", "queries.max_words=200",
            "queries.round_trip_k=8", "queries.dev_fraction=0.25", "queries.test_fraction=0.25",
            "queries.shard_size=10", "queries.examples=[what causes wheezing]",
            "synth.synthetic_per_query=0", "synth.instruction_pool_size=0", "synth.miners=[bm25]",
            "synth.mine_depth=5", "synth.shard_size=16", "train.batch_size=4", "train.max_steps=2",
            "train.evaluate_dev=false", "train.checkpoint_every=100", "search.dev_corpus_size=8",
            "search.dev_pool_depth=2", "search.cpus_per_trial=1", "search.num_samples=2", "merge.searcher=grid",
            "merge.methods=[linear]", "merge.weight_grid=[1.0]", "model.batch_size=16"]
    cfg = load_config(None, over)
    m = run_pipeline(cfg, show_progress=False)
    assert [s for s, v in m["stages"].items() if v["status"] == "done"] == [
        "queries", "synthesize", "train", "instructions", "merge", "evaluate"]
    counts = m["stages"]["queries"]["counts"]["tasks"]
    for spec in specs:
        r = counts[spec]
        assert r["generated"] == 8 * 3 and r["documents_sampled"] == 8
        assert r["kept"] + sum(r["drops"].values()) == r["generated"] and set(r["drops"]) == set(DROP_REASONS)
        assert r["kept"] > 0 and r["drops"]["round_trip"] == 0  # k = the corpus size
        assert sum(v["generated"] for v in r["by_kind"].values()) == r["generated"]
        task = load_task(spec, run_dir=str(run))
        assert task.name == spec
        # splits are disjoint document sets; each kept query names its source document
        docs_of = {s: set(task.qrels[s].column("corpus-id").to_pylist()) for s in ("train", "dev")}
        assert docs_of["train"] and docs_of["dev"] and not docs_of["train"] & docs_of["dev"]
    notes_task = load_task(specs[0], run_dir=str(run))
    assert notes_task.synthetic_splits == ("train", "dev", "test") and counts[specs[0]]["test"] == "synthetic"
    note_docs = {s: set(notes_task.qrels[s].column("corpus-id").to_pylist()) for s in ("train", "dev", "test")}
    assert note_docs["test"] and not note_docs["test"] & (note_docs["train"] | note_docs["dev"])
    beir_task = load_task(specs[1], run_dir=str(run))
    assert beir_task.synthetic_splits == ("train", "dev") and counts[specs[1]]["test"] == "real"
    assert sorted(beir_task.qrels["test"].column("query-id").to_pylist()) == [f"q{i}" for i in range(1, 9)]
    # the rest of the loop ran on the generated pairs: shards for both tasks, experts, evaluation of both
    table = m["stages"]["evaluate"]["counts"]["ndcg_at_10"]
    assert set(table["base"]) == {*specs, "mean"} and "merged" in table
    report = (run / "report.md").read_text()
    assert "## Query synthesis" in report and "(synthetic queries, test too)" in report
    assert "(synthetic train, real test)" in report and "Dev sets of" in report

    # a filter setting changed: refiltered from the raw generations (not generated again); synthesis follows
    raw = sorted((run / "queries").rglob("raw/part-*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in raw]
    again = run_pipeline(load_config(None, [*over, "queries.round_trip_k=1"]), stages=["queries", "synthesize"],
                         show_progress=False)
    assert [p.stat().st_mtime_ns for p in raw] == mtimes
    assert again["stages"]["queries"]["action"] == "redone" and again["stages"]["synthesize"]["action"] == "redone"
    r1 = again["stages"]["queries"]["counts"]["tasks"][specs[0]]
    assert r1["drops"]["round_trip"] > 0 and r1["kept"] < counts[specs[0]]["kept"]
    # a lost raw shard is generated again, alone; the unchanged config is reused as a whole afterwards
    raw[0].unlink()
    run_pipeline(load_config(None, [*over, "queries.round_trip_k=1", "queries.min_words=2"]), stages=["queries"],
                 show_progress=False)
    assert raw[0].is_file() and [p.stat().st_mtime_ns for p in raw[1:]] == mtimes[1:]
    same = run_pipeline(load_config(None, [*over, "queries.round_trip_k=1", "queries.min_words=2"]),
                        stages=["queries"], show_progress=False)
    assert same["stages"]["queries"]["action"] == "reused"
    filtered = pq.read_table(next((run / "queries").rglob("filtered.parquet"))).to_pylist()
    assert {r["drop"] for r in filtered} <= {"", *DROP_REASONS}


@pytest.mark.integration
def test_score_filter_drops_below_min_score_and_too_easy(tmp_path, ray_local, tiny_bert_dir):
    """The cascade's later steps on hand-made generations: the reranker's score (a cross-encoder folder) drops the
    pairs under queries.min_score, the too-easy filter drops first-ranked sources with a wide margin, each counted."""
    import numpy as np
    import torch

    from stm_ray.config import load_config
    from stm_ray.data import load_task
    from stm_ray.rerank.model import CrossEncoderReranker
    from stm_ray.synth.queries import filter_queries

    torch.manual_seed(0)
    CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=64).save(tmp_path / "ce")
    root = _md_folder(tmp_path / "notes")
    spec = f"docs:{root}"
    task = load_task(spec)
    ids = task.corpus.column("_id").to_pylist()
    raw = [{"doc_id": d, "gen": g, "kind": "question", "generated": f"{q} number {g}", "gen_tokens": 5,
            "engine_error": ""} for d, q in zip(ids, ["what is this illness", "how is it treated", "who gets it",
                                                    "is it contagious", "signs and symptoms", "long term outlook",
                                                    "risk factors for it", "how common is it"]) for g in range(2)]
    raw.append({**raw[0], "gen": 9})  # the same text again: a duplicate
    raw.append({**raw[1], "gen": 10, "generated": "", "engine_error": "engine died"})
    base = [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_bert_dir}", f"data.tasks=[{spec}]",
            "queries.round_trip_k=null", "queries.min_words=1"]
    cfg = load_config(None, [*base, f"queries.reranker={tmp_path / 'ce'}", "queries.min_score=0.0"])
    rows, drops = filter_queries(cfg, task, spec, [dict(r) for r in raw], tmp_path / "run" / "synth")
    scores = [r["score"] for r in rows if "score" in r]
    assert len(scores) == 16 and drops["duplicate"] == 1 and drops["engine_error"] == 1 and drops["score"] == 0
    cut = float(np.median(scores))
    cfg = load_config(None, [*base, f"queries.reranker={tmp_path / 'ce'}", f"queries.min_score={cut}"])
    rows, drops = filter_queries(cfg, task, spec, [dict(r) for r in raw], tmp_path / "run" / "synth")
    assert drops["score"] == sum(s < cut for s in scores) > 0
    assert all(r["drop"] == "score" for r in rows if "score" in r and r["score"] < cut)
    # too easy: with a zero margin every query whose source is ranked first is dropped, the others kept
    cfg = load_config(None, [*base, "queries.drop_easy=true", "queries.easy_margin=0.0"])
    rows, drops = filter_queries(cfg, task, spec, [dict(r) for r in raw], tmp_path / "run" / "synth")
    firsts = [r for r in rows if r.get("rank") == 0 and r.get("margin", -1) >= 0]
    assert drops["too_easy"] == len(firsts) and all(r["drop"] == "too_easy" for r in firsts)
    assert all(r["drop"] == "" for r in rows if r.get("rank", 0) > 0)
