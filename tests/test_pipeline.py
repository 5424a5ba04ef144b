"""stm-ray run: the manifest, resume/skip, stage selection. The evaluate stage runs for real on a tiny model; the
whole loop on a real Ray head is tests/test_jobs.py, run directories on object storage tests/test_storage.py and
tests/test_cluster_s3.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stm_ray.config import ConfigError, load_config


def _cfg(run_dir: str, tiny_beir: Path, model: str, *extra: str):
    return load_config(None, [f"run_dir={run_dir}", f"data.tasks=[beir:{tiny_beir}]", f"model.name_or_path={model}",
                              *extra])


def test_evaluate_stage_manifest_and_rerun(tmp_path, tiny_beir, tiny_bert_dir):
    from stm_ray.eval.evaluate import result_path
    from stm_ray.pipeline import run_pipeline
    from stm_ray.report import pipeline_table

    cfg = _cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir)
    m = run_pipeline(cfg, stages=["evaluate"], show_progress=False)
    st = m["stages"]
    assert st["evaluate"]["status"] == "done" and st["evaluate"]["action"] == "ran"
    assert [st[n]["status"] for n in ("synthesize", "train", "instructions", "merge")] == ["skipped"] * 4
    ndcg = st["evaluate"]["counts"]["ndcg_at_10"]["base"]
    path = result_path(tmp_path / "run" / "eval" / "base", f"beir:{tiny_beir}")
    result = json.loads(path.read_text())
    assert ndcg[f"beir:{tiny_beir}"] == result["scores"]["test"][0]["ndcg_at_10"]
    assert result["stm_ray"]["fingerprint"] == st["evaluate"]["items"][0]["fingerprint"]
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["stages"]["evaluate"]["status"] == "done" and on_disk["versions"]["torch"]
    assert on_disk["config"]["model"]["name_or_path"] == tiny_bert_dir
    assert "base" in pipeline_table(on_disk) and "ran" in pipeline_table(on_disk)

    again = run_pipeline(cfg, stages=["evaluate"], show_progress=False)  # same fingerprint: reused, not rewritten
    assert again["stages"]["evaluate"]["action"] == "reused" and json.loads(path.read_text()) == result
    # a field that does not change outputs: still reused
    runtime = run_pipeline(_cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir, "eval.corpus_chunk_size=3"),
                           stages=["evaluate"], show_progress=False)
    assert runtime["stages"]["evaluate"]["action"] == "reused"
    # an evaluation field: redone, and the file holds the new config's numbers (no Recall@100 any more)
    other = run_pipeline(_cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir, "eval.k_values=[1,10]"),
                         stages=["evaluate"], show_progress=False)
    item = other["stages"]["evaluate"]["items"][0]
    assert item["action"] == "redo" and item["changed"] == ["eval.k_values: [1, 3, 5, 10, 100] -> [1, 10]"]
    assert "recall_at_100" not in json.loads(path.read_text())["scores"]["test"][0]
    # --force redoes an output whose fingerprint matches
    forced = run_pipeline(_cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir, "eval.k_values=[1,10]"),
                          stages=["evaluate"], force=True, show_progress=False)
    assert forced["stages"]["evaluate"]["action"] == "redone"


def test_report_is_written_and_regenerated(tmp_path, tiny_beir, tiny_bert_dir, capsys):
    """The run writes report.md at the end; `stm-ray report` rewrites it from the files alone; stages that have not
    run are said to be missing rather than failing the report."""
    from stm_ray.cli import main
    from stm_ray.pipeline import run_pipeline

    run = tmp_path / "run"
    m = run_pipeline(_cfg(str(run), tiny_beir, tiny_bert_dir, "eval.dimensions=[16,8]"), stages=["evaluate"],
                     show_progress=False)
    text = (run / "report.md").read_text()
    counts = m["stages"]["evaluate"]["counts"]
    ndcg = counts["ndcg_at_10"]["base"]["mean"]
    assert re.search(rf"\| mean +\| {ndcg:.4f} +\|", text) and "No merge yet." in text
    at8 = counts["ndcg_at_10_by_dimension"]["base"]["8"]["mean"]
    assert "per embedding dimension" in text and re.search(rf"\| 8 +\| {at8:.4f} +\|", text)
    assert (run / "report" / "ndcg_per_task.png").stat().st_size > 1000
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == text  # from the files alone: the same report
    assert f"{ndcg:.4f}" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_failed_stage_is_recorded(tmp_path, tiny_beir):
    from stm_ray.pipeline import run_pipeline

    cfg = _cfg(str(tmp_path / "run"), tiny_beir, str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError):
        run_pipeline(cfg, stages=["evaluate"], show_progress=False)
    st = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["evaluate"]
    assert st["status"] == "failed" and "no-such-model" in st["error"]


def test_unknown_stage_is_an_error(tmp_path, tiny_beir, tiny_bert_dir):
    from stm_ray.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['trian'\]"):
        run_pipeline(_cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir), stages=["trian"])


def test_bad_run_dir_schemes_are_config_errors():
    with pytest.raises(ConfigError, match="s3://, gs:// or file://"):
        load_config(None, ["run_dir=hdfs://x/y"])


def test_run_help_names_the_stages_and_manifest():
    proc = subprocess.run([sys.executable, "-m", "stm_ray.cli", "run", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for word in ("manifest.json", "--stages", "--skip", "--serve", "jobs/pipeline.py"):
        assert word in proc.stdout



def test_early_evaluation_writes_what_the_evaluate_stage_reuses(ray_local, tmp_path, tiny_beir, tiny_bert_dir):
    """An expert that finished while others train is evaluated in a Ray task on the CPUs it freed; the evaluate
    stage waits for it and reuses its file by the evaluation fingerprint (the same numbers, not encoded again)."""
    import stm_ray.pipeline as pl
    from stm_ray.eval.evaluate import evaluate_models, result_path
    from stm_ray.modeling import Embedder
    from stm_ray.stage import recording
    from stm_ray.train.experts import ExpertResult

    cfg = _cfg(str(tmp_path / "run"), tiny_beir, tiny_bert_dir)
    folder = Embedder.from_pretrained(tiny_bert_dir).save(tmp_path / "expert-a")
    early = pl.EarlyEvaluation(cfg)
    early(ExpertResult(name="a", path=str(folder), rows=1, steps=1, final_loss=0.0, samples_per_s=0.0, wall_s=0.0))
    assert list(early.refs) == ["expert-a"]
    early.wait()
    path = result_path(tmp_path / "run" / "eval" / "expert-a", f"beir:{tiny_beir}")
    written = json.loads(path.read_text())
    with recording() as decisions:
        table = evaluate_models(cfg, {"expert-a": str(folder)}, show_progress=False)
    assert [d.action for d in decisions] == ["reuse"]
    assert table["ndcg_at_10"]["expert-a"][f"beir:{tiny_beir}"] == written["scores"]["test"][0]["ndcg_at_10"]
    # registered only when the loop trains and then evaluates, nothing is forced and eval.early is on
    seen = {}

    def spy(cfg_, show_progress, early=None):
        seen["early"] = early
        return {"fingerprint": "x"}

    runners = dict(pl.RUNNERS)
    try:
        pl.RUNNERS.update(train=spy, evaluate=lambda c, s, early=None: {"fingerprint": "y"})
        for stages, extra, force, expected in [(["train", "evaluate"], [], False, True),
                                               (["train"], [], False, False),
                                               (["train", "evaluate"], [], True, False),
                                               (["train", "evaluate"], ["eval.early=false"], False, False)]:
            pl.run_pipeline(_cfg(str(tmp_path / "run2"), tiny_beir, tiny_bert_dir, *extra), stages=stages,
                            force=force, show_progress=False)
            assert isinstance(seen.pop("early"), pl.EarlyEvaluation) is expected, (stages, extra, force)
    finally:
        pl.RUNNERS.clear()
        pl.RUNNERS.update(runners)
