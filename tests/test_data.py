from __future__ import annotations

import json

import pytest

from stm_ray.data import DataError, load_task
from stm_ray.data.icd10 import is_real_query, split_of
from tests.conftest import write_beir


def test_beir_folder_into_arrow(tiny_beir):
    t = load_task(f"beir:{tiny_beir}")
    assert t.corpus.column_names[:3] == ["_id", "title", "text"]
    assert t.corpus.num_rows == 8 and t.queries.num_rows == 8
    assert t.splits == ["test"]
    s = t.split("test")
    assert len(s) == 8
    assert s.corpus[0] == "Cholera Cholera is an acute diarrhoeal infection caused by Vibrio cholerae bacteria in water."
    assert s.relevant["q3"] == {"d3": 1}
    assert not t.report.problems


def test_beir_without_dev_holds_out_part_of_train(tmp_path):
    queries = {f"q{i}": f"query number {i}" for i in range(60)}
    rel = {q: {f"d{1 + i % 8}": 1} for i, q in enumerate(queries)}
    folder = write_beir(tmp_path / "b", queries=queries, qrels={"train": rel, "test": {"q0": {"d1": 1}}})
    t = load_task(f"beir:{folder}")
    train, dev = set(t.qrels_dict("train")), set(t.qrels_dict("dev"))
    assert dev and train and not train & dev and train | dev == set(queries)
    assert 1 <= len(dev) <= 15  # ~10% of 60
    assert dev == set(load_task(f"beir:{folder}").qrels_dict("dev"))  # fixed by query id
    assert set(t.qrels_dict("test")) == {"q0"}  # test untouched
    assert "held out" in t.description


def _corrupt(folder, name, lines):
    (folder / name).write_bytes(b"".join(lines))


@pytest.mark.parametrize("line, field, reason", [
    (b'{"_id": "d9", "text": "x"\n', None, "malformed JSON"),
    (b'{"title": "t", "text": "x"}\n', "_id", "missing"),
    (b'{"_id": "d1", "text": "again"}\n', "_id", "duplicate id 'd1' (first on line 1)"),
    (b'{"_id": "d9", "text": "caf\xe9"}\n', None, "not valid UTF-8"),
    (b'{"_id": "d9", "title": "x"}\n', "text", "missing"),
])
def test_bad_corpus_rows_name_file_line_field(tmp_path, line, field, reason):
    folder = write_beir(tmp_path / "b")
    good = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    _corrupt(folder, "corpus.jsonl", good[:3] + [line] + good[3:])
    with pytest.raises(DataError) as e:
        load_task(f"beir:{folder}", strict=True)
    msg = str(e.value)
    assert "corpus.jsonl:4: " in msg and reason in msg
    if field:
        assert f"field '{field}'" in msg
    # non-strict: the bad row is skipped, counted and reported; nothing else is lost
    t = load_task(f"beir:{folder}")
    assert t.corpus.num_rows == 8
    assert len(t.report.problems) == 1 and t.report.problems[0].line == 4
    assert sum(t.report.counts().values()) == 1 and "byte" not in str(t.report.counts())


def test_qrels_with_unknown_ids_are_counted_or_fatal(tmp_path):
    folder = write_beir(tmp_path / "b", qrels={"test": {"q1": {"d1": 1, "d404": 1}, "q999": {"d2": 1}}})
    t = load_task(f"beir:{folder}")
    assert t.qrels["test"].num_rows == 1
    reasons = sorted(str(p) for p in t.report.problems)
    assert len(reasons) == 2
    assert "test.tsv:3: field 'corpus-id': unknown id 'd404'" in reasons[0]
    assert "test.tsv:4: field 'query-id': unknown id 'q999'" in reasons[1]
    assert t.report.counts() == {"corpus-id: unknown id": 1, "query-id: unknown id": 1}
    with pytest.raises(DataError, match=r"test.tsv:3: field 'corpus-id': unknown id 'd404'.*strict"):
        load_task(f"beir:{folder}", strict=True)


def test_bad_qrels_score_and_missing_files(tmp_path):
    folder = write_beir(tmp_path / "b")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(DataError, match=r"test.tsv:2: field 'score': not a number"):
        load_task(f"beir:{folder}", strict=True)
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataError, match="queries.jsonl: file not found"):
        load_task(f"beir:{folder}")
    with pytest.raises(DataError, match="not a folder"):
        load_task(f"beir:{tmp_path / 'nope'}")


def test_unknown_task_kind_lists_valid_forms():
    with pytest.raises(DataError, match="valid forms: icd10, icd10:CHAPTERS, beir:DIR, mteb:TaskName"):
        load_task("hf:foo")


def test_mteb_offline_says_so_and_suggests_beir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"mteb:SciFact: .*beir:DIR"):
        load_task("mteb:SciFact")


def test_icd10_task_shape_and_split():
    t = load_task("icd10")
    assert t.corpus.num_rows > 46_000
    assert t.queries.num_rows > 12_000
    assert set(t.splits) == {"train", "dev", "test"}
    assert {"chapter", "area"} <= set(t.corpus.column_names) and {"chapter", "area"} <= set(t.queries.column_names)
    by_split = {s: set(t.qrels[s].column("query-id").to_pylist()) for s in t.splits}
    assert not (by_split["train"] & by_split["dev"]) and not (by_split["train"] & by_split["test"]) and not (by_split["dev"] & by_split["test"])
    n = t.queries.num_rows
    assert 0.07 * n < len(by_split["test"]) < 0.13 * n
    row = t.corpus.slice(1, 1).to_pylist()[0]
    assert row["_id"] == "A00.0" and row["text"].startswith("Cholera due to") and row["chapter"] == 1
    # a known inclusion term maps to the code that lists it
    q = {x["text"]: x["_id"] for x in t.queries.to_pylist()}
    qid = q["Classical cholera"]
    split = split_of("classical cholera")
    assert t.qrels_dict(split)[qid] == {"A00.0": 1}


def test_icd10_is_deterministic_and_filters_chapters():
    a, b = load_task("icd10:1,2"), load_task("icd10:1,2")
    assert a.queries.equals(b.queries) and a.qrels["test"].equals(b.qrels["test"])
    assert set(a.corpus.column("chapter").to_pylist()) == {1, 2}
    with pytest.raises(DataError, match="chapters must be numbers"):
        load_task("icd10:x")


def test_icd10_drops_cross_references():
    assert is_real_query("Classical cholera")
    assert not is_real_query("Conditions classifiable to D07")
    assert not is_real_query("Categories B90-B94 are to be used to indicate conditions")
    assert not is_real_query("ab")


def test_subsample_is_deterministic(tiny_beir):
    t = load_task(f"beir:{tiny_beir}")
    a, b = t.split("test", max_queries=3), t.split("test", max_queries=3)
    assert a.query_ids == b.query_ids and len(a) == 3


def test_cli_data_inspect_reports_problems(tmp_path, capsys):
    from stm_ray.cli import main

    folder = write_beir(tmp_path / "b")
    with (folder / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"title": "no id", "text": "x"}) + "\n")
    assert main(["data", "inspect", f"beir:{folder}"]) == 0
    out = capsys.readouterr().out
    assert "corpus.jsonl:9: field '_id': missing" in out
    assert main(["data", "inspect", f"beir:{folder}", "--strict"]) == 2
