"""Run records (stm_ray.records): one rule for a missing, corrupt or foreign record file, atomic writes, the stage
record sequence and the run manifest. Plain files, no Ray."""

from __future__ import annotations

import json
import logging

import pytest

from stm_ray.config import load_config
from stm_ray.records import Manifest, StageRecord, read_record, write_record
from stm_ray.stage import fingerprint


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.WARNING, logger="stm_ray.records")
    return caplog


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stm_ray.records" and r.levelno == logging.WARNING]


def _cfg(tmp_path):
    return load_config(None, [f"run_dir={tmp_path / 'run'}"])


def test_a_missing_record_is_none_without_a_warning(tmp_path, warnings):
    assert read_record(tmp_path / "nothing.json") is None
    assert read_record(tmp_path / "no-folder" / "nothing.json") is None
    assert _warned(warnings) == []


def test_a_corrupt_record_is_none_with_one_warning_naming_the_file(tmp_path, warnings):
    path = tmp_path / "manifest.json"
    path.write_text('{"fingerprint": "abc", "status": "do')  # cut off mid-write
    assert read_record(path, kind="synthesis manifest") is None
    assert read_record(path, kind="synthesis manifest") is None  # read again (another stage): no second warning
    [msg] = _warned(warnings)
    assert str(path) in msg and "synthesis manifest is not valid JSON" in msg and "treated as missing" in msg
    path.write_bytes(b"\xff\xfe not utf-8")
    assert read_record(path) is None and len(_warned(warnings)) == 2  # a changed file warns again


@pytest.mark.parametrize("text, what", [("[1, 2]", "is not a JSON object (a list)"), ('"done"', "(a str)"),
                                        ("null", "(a NoneType)")])
def test_a_foreign_record_is_none_with_a_warning(tmp_path, warnings, text, what):
    path = tmp_path / "merge.json"
    path.write_text(text)
    assert read_record(path, kind="merge result") is None
    [msg] = _warned(warnings)
    assert str(path) in msg and what in msg


def test_a_record_without_the_required_keys_is_none_with_a_warning(tmp_path, warnings):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"instructions": ["x"]}))
    assert read_record(path, kind="instruction pool", require=("task",)) is None
    [msg] = _warned(warnings)
    assert str(path) in msg and "instruction pool lacks 'task'" in msg
    assert read_record(path, kind="instruction pool") == {"instructions": ["x"]}  # nothing required: a record


def test_an_unreadable_path_is_none_with_a_warning(tmp_path, warnings):
    (tmp_path / "a.json").mkdir()
    assert read_record(tmp_path / "a.json") is None
    [msg] = _warned(warnings)
    assert "cannot be read (IsADirectoryError" in msg


def test_write_record_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "record.json"
    obj = {"fingerprint": "f", "status": "done", "result": {"ndcg": 0.5, "tasks": ["a", "é"]}}
    assert write_record(path, obj) == path
    assert read_record(path) == obj and path.read_text().endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temporary file left
    with pytest.raises(TypeError):
        write_record(path, {"bad": object()})
    assert read_record(path) == obj and [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_stage_record_sequence_writes_the_fields_stages_always_wrote(tmp_path):
    cfg = _cfg(tmp_path)
    fp = fingerprint("queries", cfg, {"source": "x"})
    rec = StageRecord(tmp_path / "q" / "manifest.json", fp, kind="queries manifest")
    assert rec.decide("docs:x").action == "run" and rec.record is None
    rec.begin(spec="docs:x")
    on_disk = json.loads(rec.path.read_text())
    assert list(on_disk) == ["fingerprint", "fingerprint_material", "status", "spec"]
    assert on_disk["status"] == "running" and on_disk["fingerprint"] == fp.value
    assert StageRecord(rec.path, fp).decide("docs:x").action == "resume"
    rec.done(spec="docs:x", result={"kept": 3})
    on_disk = json.loads(rec.path.read_text())
    assert list(on_disk) == ["fingerprint", "fingerprint_material", "status", "spec", "result"]
    again = StageRecord(rec.path, fp)
    assert again.decide("docs:x").action == "reuse" and again.record["result"] == {"kept": 3}
    assert StageRecord(rec.path, fp).decide("docs:x", finished=lambda r: False).action == "resume"
    other = fingerprint("queries", cfg, {"source": "y"})
    assert StageRecord(rec.path, other).decide("docs:x").action == "redo"


@pytest.mark.parametrize("text", ['{"fingerprint": "abc", "sta', "[]"])
def test_a_corrupt_or_foreign_stage_record_means_run_everywhere(tmp_path, warnings, text):
    """The same rule for every stage: a corrupt synthesis manifest (once 'redo' there) and a corrupt queries
    manifest (always 'run') both mean run; synthesis then removes the shards nobody can vouch for."""
    from stm_ray.synth.negatives import prepare_shards

    cfg = _cfg(tmp_path)
    out = tmp_path / "run" / "synth"
    (out / "task").mkdir(parents=True)
    (out / "task" / "part-00000.parquet").write_bytes(b"stale")
    (out / "cache").mkdir()
    (out / "cache" / "emb.npy").write_bytes(b"kept")
    (out / "manifest.json").write_text(text)
    queries = tmp_path / "run" / "queries" / "docs-x" / "manifest.json"
    queries.parent.mkdir(parents=True)
    queries.write_text(text)

    fp = fingerprint("synthesize", cfg, {"tasks": {}})
    decision, manifest = prepare_shards(out, fp, cfg)
    assert decision.action == "run" and decision.previous is None
    assert not (out / "task").exists() and (out / "cache" / "emb.npy").is_file()  # rebuilt; the cache stays
    assert read_record(out / "manifest.json")["status"] == "running"  # marked before any shard is written
    qfp = fingerprint("queries", cfg, {"source": "x"})
    assert StageRecord(queries, qfp, kind="queries manifest").decide("docs:x").action == "run"
    assert sum(str(out / "manifest.json") in m for m in _warned(warnings)) == 1
    assert sum(str(queries) in m for m in _warned(warnings)) == 1


def test_synthesis_reuses_only_a_done_manifest_whose_shards_are_all_there(tmp_path):
    from stm_ray.synth.negatives import prepare_shards

    cfg = _cfg(tmp_path)
    out = tmp_path / "run" / "synth"
    fp = fingerprint("synthesize", cfg, {"tasks": {}})
    (out / "t").mkdir(parents=True)
    (out / "t" / "part-00000.parquet").write_bytes(b"rows")
    StageRecord(out / "manifest.json", fp).done(result={"rows": 1}, shards=["t/part-00000.parquet"])
    decision, manifest = prepare_shards(out, fp, cfg)
    assert decision.action == "reuse" and manifest.record["result"] == {"rows": 1}
    (out / "t" / "part-00000.parquet").unlink()
    assert prepare_shards(out, fp, cfg)[0].action == "resume"


def test_the_run_manifest_carries_over_and_starts_anew_when_corrupt(tmp_path, warnings):
    import stm_ray.pipeline

    assert stm_ray.pipeline.Manifest is Manifest and stm_ray.pipeline.MANIFEST == "manifest.json"
    cfg = _cfg(tmp_path)
    m = Manifest(cfg)
    m.update("train", status="done", seconds=1.0)
    again = Manifest(cfg)
    assert again.stage("train")["status"] == "done" and again.data["created"] == m.data["created"]
    assert again.stage("evaluate") == {"status": "pending"}
    m.path.write_text('{"stages": {"train": ')
    fresh = Manifest(cfg)
    assert fresh.stage("train") == {"status": "pending"}
    assert any(str(m.path) in w and "run manifest is not valid JSON" in w for w in _warned(warnings))
    m.path.write_text(json.dumps({"something": "else"}))
    assert Manifest(cfg).stage("train") == {"status": "pending"}
    assert any("run manifest lacks 'stages'" in w for w in _warned(warnings))
