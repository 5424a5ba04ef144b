"""mergekit merges (real mergekit, Python API) of tiny BERT and Llama experts, and the BERT alias shim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stm_ray.merge import merge_models, mergekit_config
from stm_ray.merge.compat import has_alias_bug
from stm_ray.modeling import Embedder


def _experts(src: str, root: Path, n: int = 2, scale: float = 0.05) -> list[str]:
    """Saved Embedder folders: the source model (index 0) and perturbed copies of it."""
    out = []
    for i in range(n + 1):
        emb = Embedder.from_pretrained(src, device="cpu")
        if i:
            torch.manual_seed(i)
            with torch.no_grad():
                for p in emb.model.parameters():
                    if p.is_floating_point():
                        p.add_(scale * torch.randn_like(p))
        out.append(str(emb.save(root / f"m{i}")))
    return out


@pytest.fixture(scope="module")
def bert_models(tiny_bert_dir, tmp_path_factory) -> list[str]:
    return _experts(tiny_bert_dir, tmp_path_factory.mktemp("bert_experts"))


@pytest.fixture(scope="module")
def llama_models(tiny_llama_dir, tmp_path_factory) -> list[str]:
    return _experts(tiny_llama_dir, tmp_path_factory.mktemp("llama_experts"))


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


PLAIN_MERGEKIT = """
import sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
a, b, out = sys.argv[1:]
cfg = {"merge_method": "linear", "dtype": "float32", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                             {"model": b, "parameters": {"weight": 1.0}}]}
run_merge(MergeConfiguration.model_validate(cfg), out_path=out, options=MergeOptions(device="cpu", quiet=True))
"""


def test_mergekit_fails_on_bert_without_the_shim(bert_models, tmp_path):
    if not has_alias_bug():
        pytest.skip("this mergekit no longer has the alias bug; the shim is inactive")
    r = subprocess.run([sys.executable, "-c", PLAIN_MERGEKIT, bert_models[1], bert_models[2], str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert 'can only concatenate list (not "tuple") to list' in r.stderr


def test_bert_linear_merge_is_the_weighted_average(bert_models, tmp_path):
    base, a, b = bert_models
    out = merge_models("linear", {a: 0.25, b: 0.75}, tmp_path / "lin", base=base, query_instruction="query: ")
    wa, wb, wm = _weights(a), _weights(b), _weights(str(out))
    assert set(wm) == set(wa)
    for k in wa:
        torch.testing.assert_close(wm[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-6, rtol=1e-5)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["query"] == "query: "
    ours = Embedder.from_pretrained(str(out), device="cpu")
    assert ours.query_instruction == "query: "
    texts = ["asthma in children", "femur fracture"]
    torch.testing.assert_close(torch.tensor(st.encode(texts)), torch.tensor(ours.encode_corpus(texts)), atol=1e-5, rtol=1e-4)
    meta = json.loads((out / "stm_ray.json").read_text())
    assert meta["merge"]["method"] == "linear"


VLLM_EMBED = """
import sys, json
import numpy as np
from vllm import LLM
from sentence_transformers import SentenceTransformer
path, texts = sys.argv[1], ["asthma in children", "femur fracture of the left leg"]
from stm_ray.modeling.vllm_engine import cpu_engine_kwargs
kw = cpu_engine_kwargs(path, max_model_len=64, max_num_seqs=8, kv_cache_gib=None, field="kv_cache_gib")
assert "gpu_memory_utilization" not in kw and kw["kv_cache_memory_bytes"] > 0
llm = LLM(model=path, runner="pooling", **kw)
v = np.array([o.outputs.embedding for o in llm.embed(texts)])
s = SentenceTransformer(path, device="cpu").encode(texts)
print("RESULT", json.dumps({"shape": list(v.shape), "max_diff": float(np.abs(v - s).max())}))
"""


def test_merged_folder_loads_in_vllm_with_the_same_vectors(minilm_dir, tmp_path):
    """The merged folder is what users deploy: vLLM's pooling runner reads it and embeds as sentence-transformers.
    (MiniLM: vLLM's CPU attention has no kernel for the tiny test BERT's head size of 16.)"""
    import os

    base, a, b = _experts(minilm_dir, tmp_path / "experts", scale=0.01)
    out = merge_models("linear", {a: 0.5, b: 0.5}, tmp_path / "lin", base=base)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", VLLM_EMBED, str(out)], capture_output=True, text=True, timeout=400,
                       env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    res = json.loads(line[7:])
    assert res["shape"] == [2, Embedder.from_pretrained(str(out)).dim]
    assert res["max_diff"] < 1e-3


def test_weight_zero_drops_an_expert(bert_models, tmp_path):
    base, a, b = bert_models
    out = merge_models("linear", {a: 0.6, b: 0.0}, tmp_path / "one", base=base, query_instruction="Find the disease")
    assert Embedder.from_pretrained(str(out)).query_instruction == "Instruct: Find the disease\nQuery: "
    for k, v in _weights(a).items():
        torch.testing.assert_close(_weights(str(out))[k], v)
    empty = merge_models("ties", {a: 0.0, b: 0.0}, tmp_path / "none", base=base)
    for k, v in _weights(base).items():
        torch.testing.assert_close(_weights(str(empty))[k], v)


def test_merged_model_keeps_the_matryoshka_dims_all_experts_share(bert_models, tmp_path):
    import json
    import shutil

    base, a, b = bert_models
    folders = []
    for src, dims in ((a, [32, 16]), (b, [32, 16, 8])):
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        meta = json.loads((dst / "stm_ray.json").read_text())
        (dst / "stm_ray.json").write_text(json.dumps({**meta, "matryoshka_dims": dims}))
        folders.append(str(dst))
    out = merge_models("linear", {folders[0]: 0.5, folders[1]: 0.5}, tmp_path / "both", base=base)
    assert Embedder.from_pretrained(str(out)).matryoshka_dims == [32, 16]
    assert json.loads((out / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == [32, 16]
    mixed = merge_models("linear", {folders[0]: 0.5, b: 0.5}, tmp_path / "mixed", base=base)  # b: not trained for it
    assert Embedder.from_pretrained(str(mixed)).matryoshka_dims is None
    assert "matryoshka_dims" not in json.loads((mixed / "config_sentence_transformers.json").read_text())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_bert_task_vector_methods(bert_models, tmp_path, method):
    base, a, b = bert_models
    out = merge_models(method, {a: 0.5, b: 0.5}, tmp_path / method, base=base, density=0.5)
    wm, w0, wa = _weights(str(out)), _weights(base), _weights(a)
    k = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(wm[k], w0[k]) and not torch.equal(wm[k], wa[k])
    if method == "task_arithmetic":  # base + sum of weighted task vectors
        expect = w0[k] + 0.5 * (wa[k] - w0[k]) + 0.5 * (_weights(b)[k] - w0[k])
        torch.testing.assert_close(wm[k], expect, atol=1e-6, rtol=1e-5)
    assert Embedder.from_pretrained(str(out), device="cpu").encode_corpus(["x"]).shape == (1, 32)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_llama_merge_loads_in_sentence_transformers(llama_models, tmp_path, method):
    base, a, b = llama_models
    out = merge_models(method, {a: 0.5, b: 0.5}, tmp_path / method, base=base, density=0.7)
    if method == "linear":
        wa, wb, wm = _weights(a), _weights(b), _weights(str(out))
        for k in wa:
            torch.testing.assert_close(wm[k], 0.5 * (wa[k] + wb[k]), atol=1e-6, rtol=1e-5)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    ours = Embedder.from_pretrained(str(out), device="cpu")
    assert ours.pooling == "eos" and ours.is_decoder
    texts = ["chest pain on exertion"]
    torch.testing.assert_close(torch.tensor(st.encode(texts)), torch.tensor(ours.encode_corpus(texts)), atol=1e-4, rtol=1e-3)


def test_mergekit_config_shapes():
    cfg = mergekit_config("ties", {"/a": 0.5, "/b": 0.0, "/c": 1.0}, base="/base", density=0.3)
    assert [m["model"] for m in cfg["models"]] == ["/a", "/c"]
    assert all(m["parameters"]["density"] == 0.3 for m in cfg["models"])
    assert cfg["base_model"] == "/base"
    lin = mergekit_config("linear", {"/a": 1.0})
    assert "base_model" not in lin and "density" not in lin["models"][0]["parameters"]
    with pytest.raises(ValueError, match="needs a base model"):
        mergekit_config("task_arithmetic", {"/a": 1.0})
    with pytest.raises(ValueError, match="methods: linear, ties"):
        mergekit_config("slerp2", {"/a": 1.0})
