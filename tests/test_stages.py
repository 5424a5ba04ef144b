"""The stage registry is the one list of stages: the pipeline, the CLI and the README follow it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stm_ray import stages

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pipeline_order_and_runners_follow_the_registry():
    from stm_ray import pipeline

    assert pipeline.STAGES == tuple(s.name for s in stages.STAGES if s.name != "serve")
    assert set(pipeline.RUNNERS) == set(pipeline.STAGES)
    for st in stages.STAGES:
        assert callable(st.load()), st.function


def test_cli_commands_and_help_come_from_the_registry():
    from stm_ray.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for st in stages.STAGES:
        if st.command is None:
            continue
        assert st.command.replace("-", "_") in {c.replace("-", "_") for c in COMMANDS}, st.command
        p = sub.choices[st.command]
        assert p.description.startswith(st.description) and st.function in p.description
        assert any(a.help == st.help for a in sub._choices_actions if a.dest == st.command)
    run_help = sub.choices["run"].format_help()
    for st in stages.STAGES:
        assert f"  {st.name} " in run_help, st.name


def test_readme_stage_table_is_the_registrys():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- stage table")
    table = text[text.index("\n", start) + 1:text.index("<!-- end of stage table -->")].strip()
    assert table == stages.markdown_table(), "README's stage table is stale: regenerate it (see the comment above it)"


def test_choose_stages_follows_what_the_config_has():
    from stm_ray.config import ConfigError, load_config
    from stm_ray.pipeline import choose_stages

    cfg = load_config(None, ["data.tasks=[icd10]"])
    assert choose_stages(cfg) == ["synthesize", "train", "instructions", "merge", "evaluate"]
    assert choose_stages(cfg, serve=True)[-1] == "serve"
    assert choose_stages(cfg, stages=["merge", "train"], skip=["merge"]) == ["train"]
    full = load_config(None, ["data.tasks=[docs:icd10:9]", "rerank.rerankers=[cross-encoder]",
                              "teacher.kind=reranker", "teacher.reranker=cross-encoder"])
    assert choose_stages(full) == list(stages.LOOP)
    with pytest.raises(ConfigError, match="stage 'queries' needs a docs: task"):
        choose_stages(cfg, stages=["queries"])
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['trian'\]"):
        choose_stages(cfg, stages=["trian"])
