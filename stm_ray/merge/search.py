"""``search_merge(cfg)``: Ray Tune over mergekit merges of the experts, scored on the dev sets.

Each trial merges the experts with mergekit (``stm_ray.merge.merge_models``) into a scratch folder, scores mean dev
NDCG@10 over the tasks (Recall@10 breaks ties) and deletes the folder. ``merge.searcher=optuna`` samples
``merge.num_samples`` points with TPE (started from the equal-weight linear merge); ``grid`` runs the paper's grid
(weights ``merge.weight_grid`` per expert, densities ``merge.density_grid`` for TIES/DARE). Layout::

    <run_dir>/search/base/                  the base model in the experts' layout (ties/dare/task arithmetic)
    <run_dir>/search/tune/merge-<fp>/       the Tune experiment (a rerun resumes it)
    <run_dir>/search/merge_trials.png       score per trial, best so far, base and expert scores
    <run_dir>/merged/                       the winner: a sentence-transformers folder
    <run_dir>/merged/merge.json             method, coefficients, dropped experts, dev scores, the trial table
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stm_ray.data import DataError
from stm_ray.merge.mergekit_run import USES_DENSITY, merge_models, prepare_base
from stm_ray.ray_setup import init_local_ray
from stm_ray.records import read_record
from stm_ray.stage import Fingerprint, fingerprint
from stm_ray.storage import cache_dir, is_remote, reference, run_path
from stm_ray.tune.common import best_row, decide_search, plot_trials, run_tuner, trial_rows, tune_storage
from stm_ray.tune.dev import cached_dev_embeddings, dev_sets, objective, score_embedder, score_folders
from stm_ray.tune.instructions import load_tasks
from stm_ray.utils import atomic_write_json

log = logging.getLogger("stm_ray.tune")


@dataclass
class MergeSearchResult:
    path: str
    method: str
    weights: dict[str, float]
    density: float | None
    dropped: list[str]
    dev: dict[str, Any]
    base_dev: dict[str, Any]
    experts_dev: dict[str, dict[str, Any]]
    trials: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False
    fingerprint: str = ""

    @property
    def best_single(self) -> tuple[str, float]:
        name = max(self.experts_dev, key=lambda n: self.experts_dev[n]["ndcg_at_10"])
        return name, self.experts_dev[name]["ndcg_at_10"]


def find_experts(cfg) -> dict[str, str]:
    """{name: folder} of the run's finished experts (``merge.experts`` selects)."""
    from stm_ray.train.experts import current_experts

    root = run_path(cfg.run_dir) / "experts"
    found = current_experts(cfg.run_dir)
    wanted = cfg.merge.experts
    if wanted:
        missing = [n for n in wanted if n not in found]
        if missing:
            raise DataError(f"merge.experts: {missing} not found under {root}; finished experts: {sorted(found)}")
        found = {n: found[n] for n in wanted}
    if not found:
        raise DataError(f"no finished expert under {root} (run `stm-ray train` first)")
    return found


def _grid_points(components: list[str], methods: list[str], weights: list[float],
                 densities: list[float]) -> list[dict[str, Any]]:
    """Every grid point; all-zero weights included (it merges to the base model, a reference point)."""
    points = []
    for method in methods:
        comps = [c for c in components if c != "base" or method == "linear"]
        for ws in itertools.product(weights, repeat=len(comps)):
            for d in (densities if method in USES_DENSITY else [None]):
                points.append({"method": method, "density": d, **{f"w_{c}": w for c, w in zip(comps, ws)}})
    return points


def _read_point(config: dict[str, Any], components: list[str]) -> tuple[str, dict[str, float], float | None]:
    point = config.get("point", config)
    method = point["method"]
    # Tune's quantized samples carry float noise (0.6000000000000001): round to the grid's resolution
    weights = {c: round(float(point.get(f"w_{c}", 0.0) or 0.0), 6) for c in components if c != "base" or method == "linear"}
    density = point.get("density") if method in USES_DENSITY else None
    return method, weights, None if density is None else round(float(density), 6)


def merge_trial(config: dict[str, Any], spec: dict[str, Any], dev) -> None:
    """A Tune trial: merge one point into a scratch folder, score it on the dev sets, report, delete."""
    import torch
    from ray import tune

    from stm_ray.modeling import Embedder

    torch.set_num_threads(spec["threads"])
    t0, started = time.perf_counter(), time.time()
    method, weights, density = _read_point(config, spec["components"])
    # node-local scratch on a remote run (the driver's run folder is not on this node)
    scratch = Path(spec["scratch"] or cache_dir() / "scratch") / uuid.uuid4().hex[:12]
    try:
        merge_models(method, {spec["paths"][c]: w for c, w in weights.items()}, scratch, base=spec["base"],
                     density=density, dtype=spec["dtype"], query_instruction=spec["query_instruction"], seed=spec["seed"])
        emb = Embedder.from_pretrained(str(scratch), **spec["model_kwargs"])
        s = score_embedder(emb, dev, dimension=spec["dimension"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tune.report({"objective": objective(s.ndcg_at_10, s.recall_at_10), "ndcg_at_10": s.ndcg_at_10,
                 "recall_at_10": s.recall_at_10, "started": started, "seconds": time.perf_counter() - t0,
                 "method": method, "density": density, **{f"w_{c}": w for c, w in weights.items()},
                 **{f"ndcg/{t}": v["ndcg_at_10"] for t, v in s.per_task.items()}})


def query_instruction_for(cfg) -> str | None:
    """The query instruction the merged model gets: ``model.query_instruction``, else the instruction search's
    winner (``<run_dir>/search/instructions.json``), else None (the experts' own)."""
    if cfg.model.query_instruction is not None:
        return cfg.model.query_instruction
    found = read_record(run_path(cfg.run_dir) / "search" / "instructions.json", kind="search result") or {}
    return (found.get("best") or {}).get("instruction")


def merge_fingerprint(cfg, experts: dict[str, str], instruction: str | None) -> Fingerprint:
    """The merged model's fingerprint (the stage contract): what the merge search reads of the config, the experts
    (by the fingerprints their training recorded), the base model, the query instruction it gives the merge and
    the tasks' data (the dev sets)."""
    from stm_ray.data import task_fingerprint
    from stm_ray.modeling import model_fingerprint

    return fingerprint("merge", cfg, {"experts": {n: model_fingerprint(p) for n, p in experts.items()},
                                      "base": model_fingerprint(cfg.model.name_or_path), "instruction": instruction,
                                      "tasks": {t: task_fingerprint(t, cfg.run_dir) for t in cfg.data.tasks}})


MERGE_S = 5.0  # a trial's merge (mergekit into a scratch folder, then loading it), beside its dev scoring
MIN_TRIALS = 4


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def trial_budget(num_samples: int, per_model_s: float, concurrent: int, budget_s: float | None) -> int:
    """The trials an optuna/random merge search runs: ``num_samples``, or as many as fit ``budget_s`` at
    ``per_model_s`` + the merge per trial and ``concurrent`` trials at once (at least :data:`MIN_TRIALS`)."""
    if budget_s is None:
        return num_samples
    per_trial = (per_model_s + MERGE_S) / max(1, concurrent)
    fit = max(MIN_TRIALS, int(budget_s // per_trial))
    if fit >= num_samples:
        return num_samples
    log.warning("merge search: %d trials would take about %s here (~%.0f s each); running %d, which fit "
                "merge.time_budget_s=%.0f (merge.time_budget_s=null runs all %d; a smaller search.dev_corpus_size or "
                "search.dev_max_queries makes each trial cheaper)", num_samples, _duration(num_samples * per_trial),
                per_model_s + MERGE_S, fit, budget_s, num_samples)
    return fit


def search_merge(cfg, *, show_progress: bool = True) -> MergeSearchResult:
    """Search merge methods and coefficients with Ray Tune; write the winner to ``<run_dir>/merged``."""
    m, s = cfg.merge, cfg.search
    run_dir = run_path(cfg.run_dir).resolve()
    experts = find_experts(cfg)
    out = run_dir / "merged"
    instr = query_instruction_for(cfg)
    fp = merge_fingerprint(cfg, experts, instr)
    tune_name = f"merge-{fp.value}"
    tune_dir = f"{tune_storage(cfg)}/{tune_name}"
    decision, prev = decide_search(fp, "merge search", out / "merge.json", tune_dir)
    if decision.action == "reuse":
        return MergeSearchResult(**prev["result"], trials=prev["trials"], skipped=True)
    init_local_ray()
    log.info("merge search over %d expert(s) %s: methods %s, searcher %s%s", len(experts), list(experts), m.methods,
             m.searcher, f", scored at {m.dimension} dimensions" if m.dimension else "")
    base = str(prepare_base(cfg.model, run_dir / "search" / "base"))
    tasks = load_tasks(cfg)  # once, for the dev sets and the cached base embeddings
    dev = dev_sets(cfg, tasks)
    model_kwargs = {"max_length": cfg.model.max_length, "batch_size": cfg.model.batch_size, "device": "cpu"
                    if s.gpus_per_trial == 0 else "auto", "dtype": cfg.model.dtype}
    if instr is not None:
        model_kwargs["query_instruction"] = instr
    # the base's document embeddings: mining cached them (its queries are encoded here, with the instruction)
    cached = cached_dev_embeddings(cfg, dev, cfg.model, tasks) if cfg.model.dtype == "float32" else None
    base_dev = None
    if cached is not None:  # the base folder is written in float32, like the cached embeddings
        from stm_ray.modeling import Embedder

        base_dev = score_embedder(Embedder.from_pretrained(base, **model_kwargs), dev, corpus_embs=cached,
                                  dimension=m.dimension)
    to_score = dict(experts) if base_dev is not None else {"base": base, **experts}
    t_score = time.perf_counter()
    experts_dev = score_folders({n: reference(p) for n, p in to_score.items()}, dev, model_kwargs, cpus=s.cpus_per_trial, gpus=s.gpus_per_trial,
                                dimension=m.dimension)
    # one model's dev scoring (the experts' ran side by side as far as the trials' CPUs allow): a trial's cost
    per_model_s = (time.perf_counter() - t_score) / max(1, -(-len(to_score) // max(1, s.max_concurrent_trials)))
    if base_dev is None:
        base_dev = experts_dev.pop("base")
    for n, sc in [("base", base_dev), *experts_dev.items()]:
        log.info("dev NDCG@10 %-24s %.4f", n, sc.ndcg_at_10)

    components = list(experts) + (["base"] if m.include_base and "linear" in m.methods else [])
    # references other nodes can load (object-store URIs on a remote run)
    paths = {n: reference(p) for n, p in {**experts, "base": base}.items()}
    spec = {"components": components, "paths": paths, "base": paths["base"], "dtype": m.dtype, "query_instruction": instr,
            "seed": cfg.search.seed, "model_kwargs": model_kwargs, "threads": s.cpus_per_trial, "dimension": m.dimension,
            "scratch": None if is_remote(cfg.run_dir) else str(run_dir / "search" / "scratch")}
    from ray import tune

    if m.searcher == "grid":
        points = _grid_points(components, list(m.methods), m.weight_grid, m.density_grid)
        space, samples, seed_points = {"point": tune.grid_search(points)}, 1, None
        log.info("grid: %d trials", len(points))
    else:
        space = {f"w_{c}": tune.quniform(0.0, 1.0, m.weight_step) for c in components}
        space["method"] = tune.choice(list(m.methods))
        space["density"] = tune.quniform(0.1, 1.0, 0.05)
        samples = trial_budget(m.num_samples, per_model_s, s.max_concurrent_trials, m.time_budget_s)
        seed_points = [{"method": m.methods[0], "density": 0.5,
                        **{f"w_{c}": (0.5 if c != "base" else 0.0) for c in components}}]
    trainable = tune.with_parameters(merge_trial, spec=spec, dev=dev)
    n_trials = len(points) if m.searcher == "grid" else samples
    log.info("merge search: %d trial(s), about %s (a trial merges and scores the dev sets: ~%.0f s; %d at once)",
             n_trials, _duration(n_trials * (per_model_s + MERGE_S) / max(1, s.max_concurrent_trials)),
             per_model_s + MERGE_S, s.max_concurrent_trials)
    results = run_tuner(trainable, param_space=space, kind=m.searcher, num_samples=samples, seed=cfg.search.seed,
                        storage=tune_storage(cfg), name=tune_name,
                        resources={"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial},
                        max_concurrent=s.max_concurrent_trials, points=seed_points, show_progress=show_progress,
                        trials=n_trials, desc="merge trials")
    keys = ["method", "density", *[f"w_{c}" for c in components]]
    rows = trial_rows(results, keys)
    best = best_row(rows)
    weights = {c: float(best.get(f"w_{c}") or 0.0) for c in components if best.get(f"w_{c}") is not None}
    method, density = best["method"], best.get("density")
    dropped = [c for c, w in weights.items() if w <= 0]
    shutil.rmtree(run_dir / "search" / "scratch", ignore_errors=True)

    dev_best = {"ndcg_at_10": best["ndcg_at_10"], "recall_at_10": best["recall_at_10"],
                "per_task": {k[5:]: v for k, v in best.items() if k.startswith("ndcg/")}}
    result = MergeSearchResult(path=str(out), method=method, weights=weights, density=density, dropped=dropped,
                               dev=dev_best, base_dev=base_dev.as_dict(),
                               experts_dev={n: sc.as_dict() for n, sc in experts_dev.items()}, fingerprint=fp.value)
    meta = {"searcher": m.searcher, "trials": len(rows), "experts": experts}
    merge_models(method, {paths[c]: w for c, w in weights.items()}, out, base=base, density=density, dtype=m.dtype,
                 query_instruction=instr, seed=cfg.search.seed, metadata=meta, fingerprint=fp.value)
    plot_trials(rows, run_dir / "search" / "merge_trials.png", f"merge search ({m.searcher}, {len(rows)} trials)",
                label_key="method", reference={"base": base_dev.ndcg_at_10, **{n: sc.ndcg_at_10 for n, sc in experts_dev.items()}})
    record = asdict(result)
    record.pop("trials")
    record.pop("skipped")
    atomic_write_json(out / "merge.json", {"result": record, **fp.record(), "searcher": m.searcher,
                                           "query_instruction": instr, "experts": experts, "base_model": cfg.model.name_or_path,
                                           "dev_sets": {d.task: {"queries": len(d), "documents": len(d.corpus)} for d in dev},
                                           "trials": rows, "plot": str(run_dir / "search" / "merge_trials.png")})
    result.trials = rows
    name, single = result.best_single
    log.info("best merge: %s %s density=%s dev NDCG@10 %.4f (best single expert %s %.4f, base %.4f) -> %s", method,
             weights, density, result.dev["ndcg_at_10"], name, single, base_dev.ndcg_at_10, out)
    return result


def merge_table(result: MergeSearchResult) -> str:
    """Dev NDCG@10 per task: base, each expert, the merged model."""
    from stm_ray.tables import format_table

    tasks = list(result.dev["per_task"])
    rows = [{"model": "base", **{t: result.base_dev["per_task"][t]["ndcg_at_10"] for t in tasks},
             "mean": result.base_dev["ndcg_at_10"]}]
    for n, d in result.experts_dev.items():
        rows.append({"model": f"expert {n}", **{t: d["per_task"][t]["ndcg_at_10"] for t in tasks}, "mean": d["ndcg_at_10"]})
    coeffs = ", ".join(f"{c}={w:g}" for c, w in result.weights.items())
    rows.append({"model": f"merged ({result.method}{'' if result.density is None else f', density={result.density:g}'})",
                 **{t: result.dev["per_task"][t] for t in tasks}, "mean": result.dev["ndcg_at_10"]})
    return format_table(rows, ["model", *tasks, "mean"]) + f"\ncoefficients: {coeffs}" + (
        f"; dropped: {', '.join(result.dropped)}" if result.dropped else "")


def current_merged(cfg) -> str | None:
    """``<run_dir>/merged`` when the merge there is the one this config and these experts give; None otherwise (an
    older one is left out, with a warning)."""
    record = read_record(run_path(cfg.run_dir) / "merged" / "merge.json", kind="merge result")
    if record is None:
        return None
    recorded = record.get("fingerprint")
    current = merge_fingerprint(cfg, find_experts(cfg), query_instruction_for(cfg)).value
    if recorded == current:
        return str(run_path(cfg.run_dir) / "merged")
    log.warning("merged/ was made under another config or other experts (fingerprint %s, now %s): left out; run "
                "the merge stage", recorded, current)
    return None
