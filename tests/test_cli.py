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
