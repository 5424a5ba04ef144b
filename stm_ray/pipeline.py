"""The whole Synthesize-Train-Merge loop over one run directory, with a manifest.

The stages, their order, what each reads and writes and when it runs are the stage registry
(:mod:`stm_ray.stages`; ``stm-ray run --help`` lists them). Each is the library function its own CLI command calls.

Every stage follows the stage contract (:mod:`stm_ray.stage`): each output carries the fingerprint of what produced
it, and a rerun reuses it when the fingerprint matches, redoes it when it does not, resumes it when unfinished.
The pipeline runs each chosen stage (a stage whose outputs all match returns at once), and ``manifest.json``
records per stage its status, fingerprint, what the rule decided (``action``: ran / reused / resumed / redone, and
per output in ``items``), start time, seconds and counts (:class:`stm_ray.records.Manifest`). Change a training
field and rerun: the experts, the merge and the evaluation of the changed models are redone; synthesis and the base
model's evaluation are reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stm_ray.config import ConfigError, PipelineConfig
from stm_ray.records import MANIFEST, Manifest, config_fingerprint, versions  # noqa: F401 - re-exported
from stm_ray.records import now as _now
from stm_ray.stage import forcing, recording, summarize
from stm_ray.stages import LOOP, NAMES
from stm_ray.stages import STAGES as STAGE_LIST
from stm_ray.storage import run_path

log = logging.getLogger(__name__)

STAGES = LOOP  # the loop's stages in order (stm_ray.stages is the registry)
ALL_STAGES = NAMES


def _queries(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.synth.queries import synthesize_queries

    return synthesize_queries(cfg, show_progress=show_progress)


def _synthesize(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.synth import synthesize

    return synthesize(cfg, show_progress=show_progress).to_dict()


def _teacher(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.teacher.scores import teacher_scores

    return teacher_scores(cfg, show_progress=show_progress)


def _evaluate_one(cfg: PipelineConfig, label: str, model: str, threads: int) -> None:
    import torch

    from stm_ray.eval import evaluate_models

    torch.set_num_threads(threads)
    evaluate_models(cfg, {label: model}, show_progress=False)


class EarlyEvaluation:
    """Evaluates an expert that finished training while others still train: a Ray task on the CPUs its run held
    (``train.num_workers`` x ``train.cpus_per_worker``), writing the evaluate stage's own files, which that stage
    then reuses (waiting for the task first). On a small machine this fills the cores that the last, longest
    expert leaves idle. Only when the loop goes on to evaluate, nothing is forced and the cluster has no GPU."""

    def __init__(self, cfg: PipelineConfig) -> None:
        # a Ray worker's working directory need not be the driver's: the task gets the run directory's full path
        self.cfg = cfg.model_copy(update={"run_dir": str(run_path(cfg.run_dir).resolve())})
        self.refs: dict[str, Any] = {}

    def __call__(self, result) -> None:
        import ray

        if ray.cluster_resources().get("GPU", 0) > 0:  # the evaluate stage encodes on a GPU: faster than here
            return
        t = self.cfg.train
        cpus = t.num_workers * t.cpus_per_worker
        label = f"expert-{result.name}"
        log.info("evaluating %s now, on the %d CPU(s) its training freed", label, cpus)
        self.refs[label] = ray.remote(num_cpus=cpus)(_evaluate_one).remote(self.cfg, label, result.path, cpus)

    def wait(self) -> None:
        import ray

        for label, ref in self.refs.items():
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the evaluate stage redoes what is missing
                log.warning("early evaluation of %s failed (%s); the evaluate stage does it", label, e)
        self.refs = {}


def _train(cfg: PipelineConfig, show_progress: bool, early: EarlyEvaluation | None = None) -> dict[str, Any]:
    from stm_ray.stage import combine
    from stm_ray.train import train_experts

    results = train_experts(cfg, show_progress=show_progress, on_finished=early)
    return {"experts": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in results},
            "fingerprint": combine([r.fingerprint for r in results])}


def _instructions(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.tune import search_instructions

    # the loop tunes the base model: the merge search gives the winner to the merged model
    r = search_instructions(cfg, model=cfg.model.name_or_path, show_progress=show_progress)
    return {"model": r.model, "instruction": r.instruction, "dev": r.dev, "baseline": r.baseline,
            "trials": len(r.trials), "fingerprint": r.fingerprint}


def _merge(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.merge import search_merge

    r = search_merge(cfg, show_progress=show_progress)
    name, single = r.best_single
    return {"path": r.path, "method": r.method, "weights": r.weights, "density": r.density, "dropped": r.dropped,
            "dev": r.dev, "base_dev": r.base_dev, "experts_dev": r.experts_dev, "trials": len(r.trials),
            "gain_over_best_single": r.dev["ndcg_at_10"] - single, "best_single": name,
            "fingerprint": r.fingerprint}


def models_to_evaluate(cfg: PipelineConfig) -> dict[str, str]:
    """``{label: model}``: the base, the experts of the run's training and its merged model (when the merge is the
    one this config and these experts give; an older one is left out, with a warning)."""
    from stm_ray.merge.search import current_merged
    from stm_ray.train.experts import current_experts

    out = {"base": cfg.model.name_or_path}
    out.update({f"expert-{n}": p for n, p in current_experts(run_path(cfg.run_dir)).items()})
    merged = current_merged(cfg)
    if merged:
        out["merged"] = merged
    return out


def _rerankers(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.rerank.train import train_rerankers
    from stm_ray.stage import combine

    results = train_rerankers(cfg, show_progress=show_progress)
    return {"rerankers": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in results},
            "fingerprint": combine([r.fingerprint or r.path for r in results])}


def _rerank(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.rerank.evaluate import rerank_models

    return rerank_models(cfg, show_progress=show_progress)


def _evaluate(cfg: PipelineConfig, show_progress: bool, early: EarlyEvaluation | None = None) -> dict[str, Any]:
    from stm_ray.eval import evaluate_models

    if early is not None:
        early.wait()
    return evaluate_models(cfg, models_to_evaluate(cfg), show_progress=show_progress)


RUNNERS: dict[str, Callable[[PipelineConfig, bool], dict[str, Any]]] = {
    "queries": _queries, "synthesize": _synthesize, "teacher": _teacher, "train": _train, "instructions": _instructions, "merge": _merge,
    "evaluate": _evaluate, "rerankers": _rerankers, "rerank": _rerank,
}


def pin_models(cfg: PipelineConfig) -> PipelineConfig:
    """Hub ids of the config pinned to the revision they resolve to at the start of the run (``org/name@commit``):
    every node then loads the same weights, and the fingerprints change when the upstream model does."""
    from stm_ray.modeling.aliases import pin

    model, gen = pin(cfg.model.name_or_path), pin(cfg.synth.generator)
    specs = [r.model_copy(update={"model": pin(r.model)}) for r in cfg.rerank.rerankers]
    for old, new in [(cfg.model.name_or_path, model), (cfg.synth.generator, gen),
                     *((a.model, b.model) for a, b in zip(cfg.rerank.rerankers, specs))]:
        if old != new:
            log.info("model %s pinned to revision %s", old, new.rsplit("@", 1)[1])
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": model}),
                                  "synth": cfg.synth.model_copy(update={"generator": gen}),
                                  "rerank": cfg.rerank.model_copy(update={"rerankers": specs})})


def choose_stages(cfg: PipelineConfig, *, stages: list[str] | None = None, skip: list[str] | None = None,
                  serve: bool = False) -> list[str]:
    """The stages ``stm-ray run`` runs, in loop order (:mod:`stm_ray.stages`): ``stages`` (all but serve when
    None) minus ``skip``, minus those the config leaves out (asking for one of those by name is an error that says
    what it needs)."""
    unknown = [s for s in (stages or []) + (skip or []) if s not in NAMES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(NAMES)}")
    chosen = []
    for st in STAGE_LIST:
        asked = bool(stages) and st.name in stages
        if st.name in (skip or []) or not (asked or (not stages and st.name in LOOP) or (serve and st.name == "serve")):
            continue
        missing = st.missing(cfg) if st.name != "serve" else None
        if missing is None:
            chosen.append(st.name)
        elif asked:
            raise ConfigError(f"stage {st.name!r} needs {missing}")
    return chosen


def run_pipeline(cfg: PipelineConfig, *, stages: list[str] | None = None, skip: list[str] | None = None,
                 serve: bool = False, corpus: str | None = None, force: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """Run the stages of the loop in order over ``cfg.run_dir``; returns the manifest (also on disk).

    ``stages`` picks a subset (in loop order), ``skip`` leaves some out, ``force`` redoes every output of the chosen
    stages even when its fingerprint matches, ``serve`` deploys the merged model on Ray Serve at
    the end (``corpus``: index that task for /search).
    """
    chosen = choose_stages(cfg, stages=stages, skip=skip, serve=serve)
    import stm_ray
    from stm_ray.storage import RunSession

    cfg = pin_models(cfg)

    log.info("stm_ray from %s (version %s); run_dir %s; stages %s", Path(stm_ray.__file__).parent,
             stm_ray.__version__, cfg.run_dir, ", ".join(chosen))
    with RunSession(cfg.run_dir) as session:
        return _run_stages(cfg, chosen, session, corpus=corpus, force=force, show_progress=show_progress)


def _release_generators() -> None:
    import sys

    if "stm_ray.synth.llm" in sys.modules:
        from stm_ray.synth.llm import release_engines

        if release_engines():
            log.debug("generator engine stopped")


def _run_stages(cfg: PipelineConfig, chosen: list[str], session, *, corpus: str | None, force: bool,
                show_progress: bool) -> dict[str, Any]:
    local = run_path(cfg.run_dir)
    local.mkdir(parents=True, exist_ok=True)
    cfg.save(local / "config.yaml")
    manifest = Manifest(cfg)
    sync = session.sync
    for name in ALL_STAGES:
        if name not in chosen and manifest.stage(name).get("status") in ("pending", "running", "interrupted"):
            manifest.stage(name)["status"] = "skipped" if name != "serve" else "pending"
    manifest.save()
    # the train stage hands finished experts to it, the evaluate stage waits for it
    # (not on object storage: the task would write into its own node's working copy)
    early = (EarlyEvaluation(cfg) if cfg.eval.early and not force and "train" in chosen and "evaluate" in chosen
             and not cfg.train.use_gpu and not session.store.remote else None)
    t_all = time.perf_counter()
    for i, name in enumerate(chosen, start=1):
        head = f"[{i}/{len(chosen)}] {name}"
        log.info("%s: started", head)
        t0 = time.perf_counter()
        manifest.update(name, status="running", started=_now(), error=None)
        try:
            with forcing(force), recording() as decisions:
                if name == "serve":
                    counts = serve_run(cfg, corpus, show_progress)
                else:
                    counts = RUNNERS[name](cfg, show_progress, **({"early": early}
                                                                  if early and name in ("train", "evaluate") else {}))
        except KeyboardInterrupt:
            manifest.update(name, status="interrupted", seconds=round(time.perf_counter() - t0, 2))
            log.warning("%s: interrupted after %.0f s; its finished outputs are kept, the same command again "
                        "resumes %s", head, time.perf_counter() - t0,
                        " and ".join(s for s in chosen[i - 1:] if s != "serve") or name)
            sync()
            raise
        except BaseException as e:
            manifest.update(name, status="failed", seconds=round(time.perf_counter() - t0, 2),
                            error=f"{type(e).__name__}: {e}"[:2000])
            log.error("%s: failed after %.0f s: %s", head, time.perf_counter() - t0, e,
                      exc_info=isinstance(e, OSError) and not getattr(e, "filename", None))
            sync()
            raise
        if name != "queries":  # the queries stage's generator is Synthesize's too (synth.llm.shared_engine)
            _release_generators()
        action = summarize(decisions)
        manifest.update(name, status="done", seconds=round(time.perf_counter() - t0, 2), finished=_now(),
                        fingerprint=counts.get("fingerprint"), action=action,
                        items=[d.as_dict() for d in decisions], counts=counts)
        sync()
        log.info("%s: done in %.0f s (%s)", head, time.perf_counter() - t0, action)
    try:
        from stm_ray.report import write_report

        log.info("report: %s", write_report(local))
        sync()
    except Exception as e:  # the run's results are on disk; a plot failure must not fail the run
        log.warning("report not written (%s: %s); stm-ray report %s retries", type(e).__name__, e, cfg.run_dir)
    log.info("pipeline: %d stage(s) in %.0f s; manifest %s", len(chosen), time.perf_counter() - t_all, manifest.path)
    return manifest.data


def serve_run(cfg: PipelineConfig, corpus: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Deploy the run's merged model (the base model while the run has none) on the Ray cluster of
    ``$RAY_ADDRESS`` (a local one otherwise); the application outlives this call."""
    import os

    from stm_ray.serve import start
    from stm_ray.storage import is_remote

    # the run's merged model: by its URI on object storage (replicas fetch it), by its folder otherwise
    run = cfg.run_dir if is_remote(cfg.run_dir) else str(run_path(cfg.run_dir))
    target = run if (run_path(cfg.run_dir) / "merged").is_dir() else cfg.model.name_or_path
    info = start(cfg, target, corpus, show_progress=show_progress, address=os.environ.get("RAY_ADDRESS") or None)
    return {"url": info["url"], "model": info["args"]["model_name"], "corpus": corpus}
