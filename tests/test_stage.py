"""The stage contract without a cluster: one fingerprint rule (config fields marked on the models, inputs), one
reuse rule (run / reuse / resume / redo), and the layout rules that keep stages apart (no import cycles)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from stm_ray.config import INPUT, RUNTIME, PipelineConfig, load_config, output_values
from stm_ray.stage import READS, changes, decide, fingerprint, forcing, recording, summarize

PKG = Path(__file__).resolve().parents[1] / "stm_ray"


def _fp(stage: str, *overrides: str, inputs=None):
    return fingerprint(stage, load_config(None, list(overrides)), inputs)


@pytest.mark.parametrize("stage, override", [
    ("synthesize", "synth.concurrency=[1,4]"), ("synthesize", "synth.kv_cache_gib=3"),
    ("synthesize", "synth.max_num_seqs=64"), ("train", "train.num_workers=2"), ("train", "train.log_every=1"),
    ("train", "train.max_parallel_experts=1"), ("merge", "search.cpus_per_trial=2"), ("evaluate", "model.batch_size=8"),
    ("evaluate", "eval.corpus_chunk_size=10"), ("evaluate", "run_dir=elsewhere"), ("train", "train.shards=x"),
])
def test_runtime_and_input_fields_do_not_change_fingerprints(stage, override):
    assert _fp(stage).value == _fp(stage, override).value


@pytest.mark.parametrize("stage, override, changed", [
    ("synthesize", "synth.temperature=0.3", "synth.temperature"), ("synthesize", "data.max_queries=5", "data.max_queries"),
    ("train", "train.learning_rate=0.001", "train.learning_rate"), ("train", "train.lora.r=8", "train.lora.r"),
    ("train", "model.max_length=64", "model.max_length"), ("merge", "merge.num_samples=3", "merge.num_samples"),
    ("merge", "search.dev_max_queries=7", "search.dev_max_queries"), ("evaluate", "eval.top_k=50", "eval.top_k"),
    ("instructions", "search.instructions=[Find it]", "search.instructions"),
])
def test_output_fields_change_fingerprints_and_are_named(stage, override, changed):
    a, b = _fp(stage), _fp(stage, override)
    assert a.value != b.value
    assert any(line.startswith(changed + ":") for line in changes(a.material, b.material))


def test_stages_read_only_what_they_use():
    """Training does not read synthesis or evaluation fields: changing them reuses experts (and vice versa)."""
    for stage, override in [("train", "eval.top_k=5"), ("train", "synth.temperature=0.1"),
                            ("synthesize", "train.learning_rate=0.5"), ("synthesize", "data.test_split=other"),
                            ("evaluate", "train.epochs=3"), ("merge", "search.pool_sizes=[1]")]:
        assert _fp(stage).value == _fp(stage, override).value, (stage, override)


def test_inputs_count():
    assert _fp("evaluate", inputs={"model": "a"}).value != _fp("evaluate", inputs={"model": "b"}).value


def test_reads_name_real_fields_and_markers_are_only_the_two_kinds():
    cfg = PipelineConfig()
    for stage, paths in READS.items():
        for path in paths:
            node = cfg
            for part in path.split("."):
                assert hasattr(node, part), f"READS[{stage!r}]: {path} is not a config field"
                node = getattr(node, part)
    models = [PipelineConfig, *{type(getattr(cfg, s)) for s in PipelineConfig.model_fields
                                if isinstance(getattr(cfg, s), BaseModel)}]
    kinds = [(f.json_schema_extra or {}).get("stm_ray") for m in models for f in m.model_fields.values()
             if f.json_schema_extra]
    assert len(kinds) > 20 and set(kinds) == {RUNTIME["stm_ray"], INPUT["stm_ray"]}
    assert "run_dir" not in output_values(cfg) and "concurrency" not in output_values(cfg)["synth"]


def test_decide_is_one_rule(caplog):
    fp = _fp("train")
    other = _fp("train", "train.epochs=2")
    caplog.set_level(logging.INFO, logger="stm_ray.stage")
    with recording() as got:
        assert decide(fp, "a", None).action == "run"
        assert decide(fp, "b", fp.record()).action == "reuse"
        assert decide(fp, "c", fp.record(), complete=False).action == "resume"
        redo = decide(fp, "d", other.record())
        with forcing():
            assert decide(fp, "e", fp.record()).action == "redo"
    assert redo.action == "redo" and redo.previous == other.value and redo.changed == ["train.epochs: 2 -> 1"]
    assert [d.item for d in got] == ["a", "b", "c", "d", "e"]
    assert "train d: redo (fingerprint" in caplog.text and "train.epochs: 2 -> 1" in caplog.text
    assert summarize(got[:2]) == "ran 1, reused 1" and summarize([got[1]]) == "reused"
    # an output without a record of what produced it (an older version's) is redone, never silently reused
    assert decide(fp, "f", {"something": 1}).action == "redo"


def _imports(path: Path) -> set[str]:
    """Every stm_ray module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stm_ray"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("stm_ray"))
    return out


def test_no_stage_imports_the_pipeline_or_the_report_and_the_report_not_the_pipeline():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel in ("pipeline.py", "cli.py"):
            continue
        bad = {m for m in _imports(path) if m in ("stm_ray.pipeline", "stm_ray.cli")}
        if rel != "report.py":
            bad |= {m for m in _imports(path) if m == "stm_ray.report"}
        assert not bad, f"{rel} imports {bad}"


def test_layout_merge_search_beside_mergekit_and_instructions_with_the_data():
    assert (PKG / "merge" / "search.py").is_file() and not (PKG / "search" / "merge_search.py").exists()
    from stm_ray.data.instructions import task_instruction

    assert task_instruction("icd10:1,2", "icd10", None).startswith("Given a diagnosis")
    defs = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "def format_table(" in p.read_text()]
    assert defs == ["tables.py"]


def test_material_is_plain_json():
    fp = _fp("synthesize", inputs={"tasks": {"icd10": "x"}})
    assert json.loads(json.dumps(fp.material)) == fp.material
