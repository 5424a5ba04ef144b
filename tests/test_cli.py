from __future__ import annotations

import subprocess
import sys

import pytest

from stm_ray.cli import build_parser, main


def test_help_lists_commands_and_explains_overrides():
    text = build_parser().format_help()
    for cmd in ("demo", "evaluate", "config", "data"):
        assert cmd in text
    assert "key=value" in text and "beir:DIR" in text and "minilm" in text


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "stm_ray.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("stm-ray ")


def test_errors_are_one_line_with_exit_2(capsys):
    assert main(["evaluate", "--task", "nope:x", "--model", "minilm"]) == 2
    assert "unknown task 'nope:x'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_and_writes_report(tmp_path, capsys):
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--max-queries", "50"]) == 0
    out = capsys.readouterr().out
    assert "ALL" in out and "NDCG@10" in out
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "eval" / "base.json").is_file()


def test_job_entrypoint_evaluates_every_configured_task(tiny_bert_dir, tiny_beir, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("job_evaluate", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = tmp_path / "run"
    assert job.main([str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "local.yaml"),
                     f"run_dir={run}", f"model.name_or_path={tiny_bert_dir}",
                     f"data.tasks=['beir:{tiny_beir}', 'icd10:22']"]) == 0
    assert "NDCG@10" in capsys.readouterr().out
    files = sorted(p.name for p in (run / "eval").glob("*.json"))
    assert len(files) == 2 and files[1] == "icd10_22.json"
    assert "ndcg_at_10" in json.loads((run / "eval" / "icd10_22.json").read_text())["scores"]["test"][0]
