"""``search_instructions(cfg)``: Ray Tune over query instructions, scored by mean dev NDCG@10 (no training).

Candidates: no instruction, the built-in task instructions, ``search.instructions`` and the pools Synthesize wrote
(``<run_dir>/synth/instructions/*.json``). The model is fixed, so each task's document embeddings are computed once
and every trial only encodes the dev queries with its instruction. Training mode (:func:`search_pool_size`): each
trial trains an expert with an instruction pool of size N (STM's generic prompts) and scores it.

The winner is written to ``<run_dir>/search/instructions.json`` and, when the model is a folder of this run
(an expert or ``merged/``), into its sentence-transformers prompt config, so every later load uses it; the merge
search gives it to the merged model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stm_ray.data import RetrievalTask, load_task
from stm_ray.ray_setup import init_local_ray
from stm_ray.records import read_record
from stm_ray.stage import Fingerprint, fingerprint
from stm_ray.storage import reference, run_path
from stm_ray.tune.common import best_row, decide_search, plot_trials, run_tuner, trial_rows, tune_storage
from stm_ray.tune.dev import cached_dev_embeddings, dev_sets, objective, score_embedder, score_folders
from stm_ray.utils import atomic_write_json

log = logging.getLogger("stm_ray.tune")


@dataclass
class InstructionSearchResult:
    model: str
    instruction: str
    prefix: str
    dev: dict[str, Any]
    baseline: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    saved_to: str | None = None
    fingerprint: str = ""
    reused: bool = False


def load_tasks(cfg) -> dict[str, RetrievalTask]:
    """Every task of ``data.tasks``, by spec (loaded once for the candidates and the dev sets)."""
    return {spec: load_task(spec, strict=cfg.data.strict, run_dir=cfg.run_dir) for spec in cfg.data.tasks}


def candidate_instructions(cfg, tasks: dict[str, RetrievalTask] | None = None) -> list[str]:
    """No instruction, built-ins, the configured candidates and the synthesized pools, deduplicated in order."""
    from stm_ray.data.instructions import DEFAULT_INSTRUCTIONS, GENERIC_INSTRUCTION, task_instruction

    tasks = tasks or load_tasks(cfg)
    out = [""] + [task_instruction(spec, t.name, None) for spec, t in tasks.items()]
    out += [*DEFAULT_INSTRUCTIONS.values(), GENERIC_INSTRUCTION, *cfg.search.instructions]
    if cfg.search.use_synth_pool:
        for f in sorted((run_path(cfg.run_dir) / "synth" / "instructions").glob("*.json")):
            pool = read_record(f, kind="instruction pool") or {}
            out += [x for x in pool.get("instructions") or [] if isinstance(x, str)]
    return list(dict.fromkeys(x.strip() for x in out if x is not None))


def _embed_corpora(model_kwargs: dict[str, Any], sets, cpus: int, gpus: float):
    import ray

    @ray.remote(num_cpus=cpus, num_gpus=gpus)
    def embed(sets):
        import torch

        from stm_ray.modeling import Embedder

        torch.set_num_threads(cpus)
        emb = Embedder.from_pretrained(**model_kwargs)
        return [emb.encode_corpus(s.corpus) for s in sets]

    return embed.remote(sets)


def instruction_trial(config: dict[str, Any], spec: dict[str, Any], dev, corpus_embs) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(spec["threads"])
    t0, started = time.perf_counter(), time.time()
    instruction = spec["candidates"][config["candidate"]]
    emb = _cached_embedder(spec["model_kwargs"])
    emb.query_instruction = instruction
    s = score_embedder(emb, dev, corpus_embs=corpus_embs)
    tune.report({"objective": objective(s.ndcg_at_10, s.recall_at_10), "ndcg_at_10": s.ndcg_at_10,
                 "recall_at_10": s.recall_at_10, "started": started, "seconds": time.perf_counter() - t0,
                 "candidate": config["candidate"], "instruction": instruction,
                 **{f"ndcg/{t}": v["ndcg_at_10"] for t, v in s.per_task.items()}})


_MODEL_CACHE: dict[str, Any] = {}


def _cached_embedder(model_kwargs: dict[str, Any]):
    """Trials reuse their actor (``reuse_actors``): load the model once per actor."""
    from stm_ray.modeling import Embedder

    key = json.dumps(model_kwargs, sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = Embedder.from_pretrained(**model_kwargs)
    return _MODEL_CACHE[key]


def default_model(cfg) -> str:
    merged = run_path(cfg.run_dir) / "merged"
    return str(merged) if (merged / "merge.json").is_file() else cfg.model.name_or_path


def instructions_fingerprint(cfg, model: str) -> Fingerprint:
    """The instruction search's fingerprint (the stage contract): what it reads of the config, the model it tunes,
    the tasks' data and the instruction pools Synthesize wrote (when it uses them)."""
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    pools = {}
    if cfg.search.use_synth_pool:
        for f in sorted((run_path(cfg.run_dir) / "synth" / "instructions").glob("*.json")):
            pools[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return fingerprint("instructions", cfg, {"model": model_fingerprint(model), "pools": pools,
                                             "tasks": {t: task_fingerprint(t, cfg.run_dir) for t in cfg.data.tasks}})


def _reused(record: dict[str, Any]) -> InstructionSearchResult:
    fields = {k: record[k] for k in ("model", "dev", "baseline", "trials", "saved_to") if k in record}
    return InstructionSearchResult(instruction=record["best"]["instruction"], prefix=record["best"]["prefix"],
                                   fingerprint=record["fingerprint"], reused=True, **fields)


def search_instructions(cfg, *, model: str | None = None, save: bool = True,
                        show_progress: bool = True) -> InstructionSearchResult:
    """Score every candidate instruction (grid) or ``search.num_samples`` of them (optuna/random) on the dev sets."""
    import ray
    from ray import tune

    from stm_ray.modeling.embedder import instruction_prefix, save_query_prompt

    s = cfg.search
    run_dir = run_path(cfg.run_dir).resolve()
    model = model or default_model(cfg)
    fp = instructions_fingerprint(cfg, model)
    out = run_dir / "search" / "instructions.json"
    tune_name = f"instructions-{fp.value}"
    tune_dir = f"{tune_storage(cfg)}/{tune_name}"
    decision, record = decide_search(fp, "instruction search", out, tune_dir)
    if decision.action == "reuse":
        return _reused(record)
    tasks = load_tasks(cfg)
    candidates = candidate_instructions(cfg, tasks)
    init_local_ray()
    dev = dev_sets(cfg, tasks)
    model_kwargs = {"name_or_path": reference(model), "max_length": cfg.model.max_length, "batch_size": cfg.model.batch_size,
                    "device": "cpu" if s.gpus_per_trial == 0 else "auto", "dtype": cfg.model.dtype,
                    "pooling": cfg.model.pooling}
    log.info("instruction search on %s: %d candidates, searcher %s", model, len(candidates), s.searcher)
    corpus_embs = (cached_dev_embeddings(cfg, dev, cfg.model.model_copy(update={"name_or_path": model}), tasks)
                   if model == cfg.model.name_or_path else None)
    if corpus_embs is None:
        corpus_embs = ray.get(_embed_corpora(model_kwargs, dev, s.cpus_per_trial, s.gpus_per_trial))
    spec = {"candidates": candidates, "model_kwargs": model_kwargs, "threads": s.cpus_per_trial}
    grid = s.searcher == "grid" or len(candidates) <= s.num_samples
    space = {"candidate": tune.grid_search(list(range(len(candidates)))) if grid
             else tune.choice(list(range(len(candidates))))}
    trainable = tune.with_parameters(instruction_trial, spec=spec, dev=dev, corpus_embs=corpus_embs)
    results = run_tuner(trainable, param_space=space, kind="grid" if grid else s.searcher,
                        num_samples=1 if grid else s.num_samples, seed=s.seed, storage=tune_storage(cfg),
                        name=tune_name, resources={"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial},
                        max_concurrent=s.max_concurrent_trials, show_progress=show_progress,
                        trials=len(candidates) if grid else s.num_samples, desc="instruction trials")
    rows = trial_rows(results, ["candidate", "instruction"])
    best = best_row(rows)
    baseline = next((r for r in rows if r["instruction"] == ""), None)
    prefix = instruction_prefix(best["instruction"])
    saved_to = None
    model_dir = Path(model).resolve()
    if save and model_dir.is_dir() and run_dir in model_dir.parents:
        save_query_prompt(model_dir, prefix)
        saved_to = str(model_dir)
    result = InstructionSearchResult(
        model=model, instruction=best["instruction"], prefix=prefix,
        dev={"ndcg_at_10": best["ndcg_at_10"], "recall_at_10": best["recall_at_10"]},
        baseline={"ndcg_at_10": baseline["ndcg_at_10"], "recall_at_10": baseline["recall_at_10"]} if baseline else {},
        trials=rows, saved_to=saved_to, fingerprint=fp.value)
    atomic_write_json(out, {"best": {"instruction": best["instruction"], "prefix": prefix, **result.dev},
                            **{k: v for k, v in asdict(result).items() if k not in ("instruction", "prefix", "reused",
                                                                                    "fingerprint")},
                            **fp.record(),
                            "dev_sets": {d.task: {"queries": len(d), "documents": len(d.corpus)} for d in dev}})
    plot_trials(rows, run_dir / "search" / "instruction_trials.png", f"instruction search ({len(rows)} trials)",
                reference={"no instruction": result.baseline.get("ndcg_at_10")})
    log.info("best instruction %r: dev NDCG@10 %.4f (no instruction %.4f)%s", best["instruction"], best["ndcg_at_10"],
             result.baseline.get("ndcg_at_10", float("nan")), f"; saved into {saved_to}" if saved_to else "")
    return result


def instruction_table(result: InstructionSearchResult, top: int = 10) -> str:
    from stm_ray.tables import format_table

    rows = sorted(result.trials, key=lambda r: -r["ndcg_at_10"])[:top]
    return format_table([{"rank": i, "dev NDCG@10": r["ndcg_at_10"], "Recall@10": r["recall_at_10"],
                          "instruction": (r["instruction"] or "(none)")[:90]} for i, r in enumerate(rows, 1)],
                        ["rank", "dev NDCG@10", "Recall@10", "instruction"])


# ---------------------------------------------------------------------------------------------- training mode
def pool_trial(config: dict[str, Any], spec: dict[str, Any], dev) -> None:
    """A Tune trial that trains one expert (Ray Train) with an instruction pool of size N, then scores it."""
    from ray import tune

    from stm_ray.config import PipelineConfig
    from stm_ray.data.shards import read_shards
    from stm_ray.train.experts import train_expert

    t0, started = time.perf_counter(), time.time()
    n = int(config["pool_size"])
    cfg = PipelineConfig.model_validate(spec["cfg"])
    pool = spec["candidates"][:n]
    cfg = cfg.model_copy(update={
        "run_dir": str(Path(spec["root"]) / f"pool-{n}"),
        "train": cfg.train.model_copy(update={"instruction_mode": "pool", "instruction_pool": pool, "evaluate_dev": False}),
        "model": cfg.model.model_copy(update={"query_instruction": None})})
    table = read_shards(spec["shards"], strict=cfg.data.strict)
    res = train_expert(cfg, "all", table, pool=pool)
    s = score_folders({"expert": res.path}, dev, {"device": "cpu"}, cpus=spec["threads"])["expert"]
    tune.report({"objective": objective(s.ndcg_at_10, s.recall_at_10), "ndcg_at_10": s.ndcg_at_10,
                 "recall_at_10": s.recall_at_10, "started": started, "seconds": time.perf_counter() - t0,
                 "pool_size": n, "expert": res.path, **{f"ndcg/{t}": v["ndcg_at_10"] for t, v in s.per_task.items()}})


def search_pool_size(cfg, *, shards: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Training mode: one expert per pool size in ``search.pool_sizes`` (over all shard rows), each scored on dev."""
    from ray import tune

    from stm_ray.data.shards import shard_files
    from stm_ray.modeling import model_fingerprint

    s = cfg.search
    run_dir = run_path(cfg.run_dir).resolve()
    tasks = load_tasks(cfg)
    candidates = [c for c in candidate_instructions(cfg, tasks) if c]
    sizes = sorted({min(n, len(candidates)) for n in s.pool_sizes})
    from stm_ray.train.experts import training_shards

    source = shards or str(training_shards(cfg))
    shards_fp = hashlib.sha256(b"".join(f.read_bytes() for f in shard_files(source))).hexdigest()[:16]
    fp = fingerprint("instruction-pools", cfg, {"candidates": candidates, "sizes": sizes, "shards": shards_fp,
                                                "base": model_fingerprint(cfg.model.name_or_path)})
    path = run_dir / "search" / "instruction_pools.json"
    tune_name = f"pools-{fp.value}"
    tune_dir = f"{tune_storage(cfg)}/{tune_name}"
    decision, record = decide_search(fp, "instruction pools", path, tune_dir)
    if decision.action == "reuse":
        return record
    init_local_ray()
    dev = dev_sets(cfg, tasks)
    spec = {"cfg": cfg.model_dump(), "candidates": candidates, "root": str(run_dir / "search" / "pools"),
            "shards": source, "threads": s.cpus_per_trial}
    log.info("instruction-pool search: pool sizes %s over %d candidates, shards %s", sizes, len(candidates), source)
    # the trial itself only drives Ray Train (whose workers hold the CPUs) and a scoring task
    results = run_tuner(tune.with_parameters(pool_trial, spec=spec, dev=dev),
                        param_space={"pool_size": tune.grid_search(sizes)}, kind="grid", num_samples=1, seed=s.seed,
                        storage=tune_storage(cfg), name=tune_name, resources={"CPU": 0.01},
                        max_concurrent=s.max_concurrent_trials, show_progress=show_progress,
                        trials=len(sizes), desc="pool-size trials")
    rows = trial_rows(results, ["pool_size", "expert"])
    best = best_row(rows)
    out = {"best": {"pool_size": best["pool_size"], "instructions": candidates[:best["pool_size"]],
                    "ndcg_at_10": best["ndcg_at_10"], "recall_at_10": best["recall_at_10"], "expert": best["expert"]},
           "trials": rows, **fp.record()}
    atomic_write_json(path, out)
    log.info("best pool size %d: dev NDCG@10 %.4f (%s)", best["pool_size"], best["ndcg_at_10"],
             ", ".join(f"{r['pool_size']}: {r['ndcg_at_10']:.4f}" for r in rows if "error" not in r))
    return out
