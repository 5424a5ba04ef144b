"""The whole Synthesize-Train-Merge loop over one run directory, with a manifest.

Stages, in order (each is the function the stage's own CLI command and job entrypoint call)::

    synthesize     stm_ray.synth.synthesize          <run_dir>/synth/
    train          stm_ray.train.train_experts       <run_dir>/experts/
    instructions   stm_ray.search.search_instructions <run_dir>/search/instructions.json
    merge          stm_ray.search.search_merge       <run_dir>/merged/
    evaluate       stm_ray.eval.evaluate_tasks       <run_dir>/eval/<base|expert-NAME|merged>/<task>.json
    serve          stm_ray.serve.start               (only when asked: a long-lived application)

``<run_dir>/manifest.json`` records the config, package versions and, per stage, its status
(pending/running/done/failed/skipped), start time, seconds and counts. Every stage resumes by itself (missing
shards, unfinished experts, Tune experiments, evaluations without a result file); on top of that a stage whose
manifest entry is ``done`` under the same config fingerprint is not run again, so rerunning a finished run does
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from stm_ray.config import ConfigError, PipelineConfig

log = logging.getLogger(__name__)

STAGES = ("synthesize", "train", "instructions", "merge", "evaluate")
ALL_STAGES = (*STAGES, "serve")
MANIFEST = "manifest.json"
_PACKAGES = ("stm-ray", "ray", "torch", "transformers", "sentence-transformers", "peft", "deepspeed", "vllm",
             "mergekit", "mteb")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_fingerprint(cfg: PipelineConfig) -> str:
    """What decides a stage's output: the config without where it lives and how it is served."""
    data = cfg.model_dump(mode="json", exclude={"run_dir", "staging_dir", "serve"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``<run_dir>/manifest.json``, rewritten atomically on every change."""

    def __init__(self, cfg: PipelineConfig):
        self.path = Path(cfg.run_dir) / MANIFEST
        self.fingerprint = config_fingerprint(cfg)
        old: dict[str, Any] = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                log.warning("%s is not valid JSON; starting a new manifest", self.path)
        self.data: dict[str, Any] = {"run_dir": str(cfg.run_dir), "fingerprint": self.fingerprint,
                                     "config": cfg.model_dump(mode="json"), "versions": versions(),
                                     "created": old.get("created", _now()), "updated": _now(),
                                     "stages": old.get("stages", {})}
        for name in ALL_STAGES:
            self.data["stages"].setdefault(name, {"status": "pending"})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def is_done(self, name: str) -> bool:
        st = self.stage(name)
        return st.get("status") == "done" and st.get("fingerprint") == self.fingerprint

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"][name] = {**self.stage(name), **fields}
        self.data["updated"] = _now()
        self.save()

    def save(self) -> None:
        from stm_ray.utils import atomic_write_json

        atomic_write_json(self.path, self.data)


def _synthesize(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.synth import synthesize

    return synthesize(cfg, show_progress=show_progress).to_dict()


def _train(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.train import train_experts

    results = train_experts(cfg, show_progress=show_progress)
    return {"experts": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in results}}


def _instructions(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.search import search_instructions

    r = search_instructions(cfg, show_progress=show_progress)
    return {"model": r.model, "instruction": r.instruction, "dev": r.dev, "baseline": r.baseline,
            "trials": len(r.trials)}


def _merge(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.search import search_merge

    r = search_merge(cfg, show_progress=show_progress)
    name, single = r.best_single
    return {"path": r.path, "method": r.method, "weights": r.weights, "density": r.density, "dropped": r.dropped,
            "dev": r.dev, "base_dev": r.base_dev, "experts_dev": r.experts_dev, "trials": len(r.trials),
            "gain_over_best_single": r.dev["ndcg_at_10"] - single, "best_single": name}


def models_to_evaluate(cfg: PipelineConfig) -> dict[str, str]:
    """``{label: model}``: the base, every trained expert and the merged model (those that exist)."""
    run_dir = Path(cfg.run_dir)
    out = {"base": cfg.model.name_or_path}
    experts = run_dir / "experts"
    if experts.is_dir():
        for d in sorted(p for p in experts.iterdir() if (p / "metrics.json").is_file()):
            out[f"expert-{d.name}"] = str(d)
    if (run_dir / "merged").is_dir():
        out["merged"] = str(run_dir / "merged")
    return out


def _evaluate(cfg: PipelineConfig, show_progress: bool) -> dict[str, Any]:
    from stm_ray.eval import evaluate_tasks
    from stm_ray.eval.evaluate import result_path

    table: dict[str, dict[str, float]] = {}
    for label, model in models_to_evaluate(cfg).items():
        out = Path(cfg.run_dir) / "eval" / label  # a folder: <task>.json per task
        paths = {t: result_path(out, t) for t in cfg.data.tasks}
        todo = [t for t, p in paths.items() if not p.is_file()]
        if todo:
            log.info("evaluate %s (%s) on %s/%s", label, model, ",".join(todo), cfg.data.test_split)
            evaluate_tasks(cfg, model=model, tasks=todo, output=out, show_progress=show_progress)
        table[label] = {}
        for t, p in paths.items():
            res = json.loads(p.read_text(encoding="utf-8"))
            table[label][t] = res["scores"][cfg.data.test_split][0]["ndcg_at_10"]
        table[label]["mean"] = sum(table[label][t] for t in cfg.data.tasks) / len(cfg.data.tasks)
        log.info("NDCG@10 %s: %s", label, ", ".join(f"{k} {v:.4f}" for k, v in table[label].items()))
    return {"split": cfg.data.test_split, "ndcg_at_10": table}


RUNNERS: dict[str, Callable[[PipelineConfig, bool], dict[str, Any]]] = {
    "synthesize": _synthesize, "train": _train, "instructions": _instructions, "merge": _merge,
    "evaluate": _evaluate,
}


def run_pipeline(cfg: PipelineConfig, *, stages: list[str] | None = None, skip: list[str] | None = None,
                 serve: bool = False, corpus: str | None = None, force: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """Run the stages of the loop in order over ``cfg.run_dir``; returns the manifest (also on disk).

    ``stages`` picks a subset (in loop order), ``skip`` leaves some out, ``force`` reruns stages the manifest says
    are done (each stage still resumes from what is on disk), ``serve`` deploys the merged model on Ray Serve at
    the end (``corpus``: index that task for /search).
    """
    unknown = [s for s in (stages or []) + (skip or []) if s not in ALL_STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(ALL_STAGES)}")
    chosen = [s for s in STAGES if (not stages or s in stages) and s not in (skip or [])]
    if serve or (stages and "serve" in stages):
        chosen.append("serve")
    import stm_ray
    from stm_ray.storage import is_remote, pull, push, staging_path

    log.info("stm_ray from %s (version %s); run_dir %s; stages %s", Path(stm_ray.__file__).parent,
             stm_ray.__version__, cfg.run_dir, ", ".join(chosen))
    remote = cfg.run_dir if is_remote(cfg.run_dir) else None
    if remote:
        local = staging_path(remote, cfg.staging_dir)
        log.info("run_dir %s is staged in %s (pulled now, pushed after every stage)", remote, local)
        pull(remote, local)
        cfg = cfg.model_copy(update={"run_dir": str(local)})
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    cfg.save(Path(cfg.run_dir) / "config.yaml")
    manifest = Manifest(cfg)
    if remote:
        manifest.data.update(run_dir=remote, staging=cfg.run_dir)

    def sync() -> None:
        if remote:
            push(Path(cfg.run_dir), remote)
    for name in ALL_STAGES:
        if name not in chosen and manifest.stage(name).get("status") in ("pending", "running"):
            manifest.stage(name)["status"] = "skipped" if name != "serve" else "pending"
    manifest.save()
    t_all = time.perf_counter()
    for i, name in enumerate(chosen, start=1):
        head = f"[{i}/{len(chosen)}] {name}"
        if name != "serve" and manifest.is_done(name) and not force:
            log.info("%s: done in an earlier run (%s); skipped", head, manifest.path)
            continue
        log.info("%s: started", head)
        t0 = time.perf_counter()
        manifest.update(name, status="running", started=_now(), fingerprint=manifest.fingerprint, error=None)
        try:
            if name == "serve":
                counts = serve_run(cfg, corpus, show_progress)
            else:
                counts = RUNNERS[name](cfg, show_progress)
        except BaseException as e:
            manifest.update(name, status="failed", seconds=round(time.perf_counter() - t0, 2),
                            error=f"{type(e).__name__}: {e}"[:2000])
            log.error("%s: failed after %.0f s: %s", head, time.perf_counter() - t0, e)
            sync()
            raise
        manifest.update(name, status="done", seconds=round(time.perf_counter() - t0, 2), finished=_now(),
                        counts=counts)
        sync()
        log.info("%s: done in %.0f s", head, time.perf_counter() - t0)
    try:
        from stm_ray.report import write_report

        log.info("report: %s", write_report(cfg.run_dir))
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

    target = cfg.run_dir if (Path(cfg.run_dir) / "merged").is_dir() else cfg.model.name_or_path
    info = start(cfg, target, corpus, show_progress=show_progress, address=os.environ.get("RAY_ADDRESS") or None)
    return {"url": info["url"], "model": info["args"]["model_name"], "corpus": corpus}


def pipeline_table(manifest: dict[str, Any], *, ndcg: bool = True) -> str:
    """Per stage: status and seconds; then (``ndcg``) NDCG@10 on the test split per model, when evaluated."""
    from stm_ray.eval.evaluate import format_table

    rows = [{"stage": n, "status": s.get("status", ""), "seconds": s.get("seconds", "")}
            for n, s in manifest["stages"].items()]
    out = format_table(rows, ["stage", "status", "seconds"], floatfmt="{:.1f}")
    ev = (manifest["stages"].get("evaluate") or {}).get("counts") or {}
    if ndcg and ev.get("ndcg_at_10"):
        table = ev["ndcg_at_10"]
        cols = list(next(iter(table.values())))
        erows = [{"model": label, **scores} for label, scores in table.items()]
        out += f"\n\nNDCG@10 ({ev['split']} split):\n" + format_table(erows, ["model", *cols])
    return out
