from __future__ import annotations

import pytest
from pydantic import ValidationError

from stm_ray.cli import main
from stm_ray.config import ConfigError, PipelineConfig, load_config


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.data.tasks == ["icd10"]
    assert cfg.model.name_or_path == "minilm"
    assert cfg.synth.generator == "smollm2"
    assert cfg.serve.host == "127.0.0.1"
    assert (cfg.train.lora.r, cfg.train.lora.alpha) == (16, 32)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lora.r=32", "data.tasks=[icd10, 'beir:/data/x']", "synth.concurrency=[1,4]"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again.train.lora.r == 32
    assert again.data.tasks == ["icd10", "beir:/data/x"]
    assert again.synth.concurrency == (1, 4)


def test_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["model.max_length=null", "train.use_gpu=true", "train.learning_rate=2e-5",
                             "model.query_instruction=Find the code: ", "model.document_instruction='x'"])
    assert cfg.model.max_length is None
    assert cfg.train.use_gpu is True
    assert cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.model.query_instruction == "Find the code: "
    assert cfg.model.document_instruction == "x"


def test_invalid_value_names_dotted_path_and_reason():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lora.r=abc"])
    assert "train.lora.r" in str(e.value) and "integer" in str(e.value)
    with pytest.raises(ConfigError, match=r"synth.concurrency: .*min <= max"):
        load_config(None, ["synth.concurrency=[4,1]"])


def test_unknown_field_and_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora:\n    rank: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml[\s\S]*train.lora.rank: unknown field"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  tasks: [icd10\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.lora.r=1", "train.lora.r.x=1"])


def test_configs_are_frozen_and_splits_checked():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.train.lora.r = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="dev_split and data.test_split must differ"):
        load_config(None, ["data.dev_split=test"])


def test_cli_config_show(capsys, tmp_path):
    assert main(["config", "show", "train.lora.r=8"]) == 0
    out = capsys.readouterr().out
    assert "r: 8" in out and "tasks:" in out
    assert main(["config", "show", "train.lora.r=x"]) == 2
    assert "train.lora.r" in capsys.readouterr().err
