"""``train_experts(cfg)``: one Ray Train run per expert, concurrently, each written as a sentence-transformers folder.

Layout under ``<run_dir>``::

    train/<expert>-<fingerprint>/     Ray Train storage: checkpoints (a rerun with the same fingerprint resumes here)
    experts/<expert>/                 the expert: HF + sentence-transformers folder, LoRA merged into the base
    experts/<expert>/metrics.json     loss curve, throughput, resumes, dev NDCG@10, the fingerprint (expert done)
    experts/<expert>/loss.png         the loss curve
    experts/summary.json              one row per expert, with the base model's dev NDCG@10 next to it
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stm_ray.data.shards import read_shards
from stm_ray.data.task import DataError, DataReport
from stm_ray.stage import Decision, Fingerprint, decide, fingerprint
from stm_ray.storage import reference, run_path
from stm_ray.train.batching import TrainRows, plan_batches
from stm_ray.utils import atomic_dir, atomic_write_json, init_local_ray, save_figure

log = logging.getLogger("stm_ray.train")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ExpertResult:
    name: str
    path: str
    rows: int
    steps: int
    final_loss: float
    samples_per_s: float
    wall_s: float
    resumed_from: list[int] = field(default_factory=list)
    dev_ndcg_at_10: dict[str, float | None] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    skipped: bool = False
    fingerprint: str = ""
    peak_memory_gib: float | None = None  # rank 0's peak (RSS on CPU, allocated memory on a GPU)


def expert_groups(table: pa.Table, experts: dict[str, list[str]]) -> dict[str, pa.Table]:
    """Rows of each expert: ``experts`` maps names to shard ``expert`` tags; empty = one expert per tag."""
    tags = sorted(set(table.column("expert").to_pylist()))
    mapping = experts or {t: [t] for t in tags}
    out = {}
    for name, wanted in mapping.items():
        if not _NAME.match(name):
            raise DataError(f"train.experts: expert name {name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        unknown = [t for t in wanted if t not in tags]
        if unknown:
            raise DataError(f"train.experts.{name}: tag(s) {unknown} not in the shards; tags found: {tags}")
        out[name] = table.filter(pc.is_in(table.column("expert"), value_set=pa.array(wanted, pa.string())))
    return out


def load_instruction_pool(spec: list[str] | str | None) -> list[str]:
    """A list as given, or a JSON file holding a list or ``{"instructions": [...]}`` (Synthesize's output)."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return spec
    path = Path(spec)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"train.instruction_pool: cannot read {path}: {e}") from e
    pool = obj.get("instructions") if isinstance(obj, dict) else obj
    if not isinstance(pool, list) or not pool or not all(isinstance(x, str) for x in pool):
        raise DataError(f"{path}: field 'instructions': expected a non-empty list of strings")
    return pool


def planned_steps(rows: TrainRows, tcfg) -> tuple[int, int]:
    """(steps per epoch, total steps) of an expert's run."""
    per_epoch = len(plan_batches(rows.tasks, tcfg.batch_size, tcfg.num_workers, tcfg.seed, 0))
    total = per_epoch * tcfg.epochs
    return per_epoch, min(total, tcfg.max_steps) if tcfg.max_steps else total


def rows_fingerprint(rows: TrainRows) -> str:
    """An expert's training rows, by content (queries, positives, tasks, negatives; teacher scores when kept)."""
    h = hashlib.sha256()
    for col in (rows.queries, rows.positives, rows.tasks):
        h.update("\x1f".join(col).encode())
    h.update(json.dumps(rows.negatives).encode())
    if rows.positive_scores is not None:
        h.update(json.dumps([rows.positive_scores, rows.negative_scores]).encode())
    return h.hexdigest()[:16]


def training_shards(cfg) -> Path:
    """Where the train stage reads: the teacher stage's shards when a teacher is set (it scored ``train.shards`` or
    Synthesize's), else ``train.shards``, else Synthesize's."""
    if cfg.teacher.kind:
        return run_path(cfg.run_dir) / "teacher"
    return Path(cfg.train.shards) if cfg.train.shards else run_path(cfg.run_dir) / "synth"


def expert_fingerprint(cfg, rows: TrainRows, pool: list[str]) -> Fingerprint:
    """What decides an expert's weights (the stage contract): the model and training config, its rows and its
    instruction pool. The same fingerprint resumes from the run's checkpoints; another one trains afresh."""
    from stm_ray.modeling import model_fingerprint

    return fingerprint("train", cfg, {"rows": rows_fingerprint(rows), "instruction_pool": pool,
                                      "base": model_fingerprint(cfg.model.name_or_path)})


def _storage(cfg, name: str, fp: Fingerprint) -> tuple[str, str]:
    """(Ray Train's storage_path, the run's name): the run directory's ``train/``, on the object store itself for
    a remote run (every worker writes its checkpoints there; nothing assumes a shared disk)."""
    from stm_ray.storage import native_uri

    return native_uri(cfg.run_dir, "train"), f"{name}-{fp.value}"


def has_train_run(cfg, run_name: str) -> bool:
    """Whether ``train/<run_name>`` (an interrupted Ray Train run) exists, on the store for a remote run."""
    from stm_ray.storage import RunStore

    return run_name in RunStore(cfg.run_dir).list_dirs("train")


def clear_old_runs(cfg, prefix: str, keep: str | None) -> None:
    """Delete Ray Train runs ``train/<prefix>-<fingerprint>`` other than ``keep``: checkpoints of another
    fingerprint are of no use (on the store too, so none is ever restored by mistake)."""
    from stm_ray.storage import RunStore

    store = RunStore(cfg.run_dir)
    for old in store.list_dirs("train"):
        if re.fullmatch(rf"{re.escape(prefix)}-[0-9a-f]{{10,16}}", old) and old != keep:
            store.delete(f"train/{old}")


def decide_expert(cfg, name: str, rows: TrainRows, pool: list[str]) -> tuple[Fingerprint, Decision, dict | None]:
    """(fingerprint, decision, the finished expert's metrics.json when there is one) for expert ``name``."""
    fp = expert_fingerprint(cfg, rows, pool)
    out = run_path(cfg.run_dir).resolve() / "experts" / name
    prev = None
    try:
        prev = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    if prev is not None:
        return fp, decide(fp, name, prev, complete=True, where=str(out)), prev
    storage_path, run_name = _storage(cfg, name, fp)
    partial = {"fingerprint": fp.value} if has_train_run(cfg, run_name) else None
    return fp, decide(fp, name, partial, complete=False, where=f"{storage_path}/{run_name}"), None


def _plot_loss(loss: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(loss) + 1), loss, lw=1, alpha=0.5, label="loss")
    if len(loss) >= 10:
        w = max(2, len(loss) // 20)
        ax.plot(range(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"), lw=2, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def _dev_ndcg(model_path: str, tasks: list[str], cfg) -> dict[str, float | None]:
    """NDCG@10 on each task's dev split, in a Ray task (one CPU) so it runs where the cluster has room."""
    import ray

    @ray.remote(num_cpus=1)
    def score(path: str, task: str) -> float | None:
        from stm_ray.eval.evaluate import evaluate
        from stm_ray.utils import setup_logging

        setup_logging()
        try:
            res = evaluate(path, task, cfg.data.dev_split, model_cfg=cfg.model.model_copy(update={"name_or_path": path}),
                           eval_cfg=cfg.eval, max_queries=cfg.data.max_queries, use_mteb=False, show_progress=False)
        except (DataError, KeyError, ValueError) as e:
            logging.getLogger("stm_ray.train").warning("dev evaluation of %s on %s skipped: %s", path, task, e)
            return None
        return res.ndcg_at_10

    refs = {t: score.remote(model_path, t) for t in tasks}
    return {t: ray.get(r) for t, r in refs.items()}


def train_expert(cfg, name: str, table: pa.Table, *, pool: list[str] | None = None,
                 progress_actor: str | None = None,
                 decided: tuple[Fingerprint, Decision, dict | None] | None = None) -> ExpertResult:
    """Train one expert with a Ray Train TorchTrainer and write ``<run_dir>/experts/<name>``; reuse, resume or
    redo it by the stage contract (``decided``: the decision :func:`decide_expert` already made)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stm_ray.train.worker import MODEL_DIR, STATE_FILE, train_loop

    tcfg = cfg.train
    pool = pool or []
    run_dir = run_path(cfg.run_dir).resolve()
    out = run_dir / "experts" / name
    rows = TrainRows.from_table(table, tcfg.negative_sources, scores=tcfg.distill is not None)
    if len(rows) == 0:
        raise DataError(f"expert {name}: no training rows")
    fp, decision, prev = decided or decide_expert(cfg, name, rows, pool)
    if decision.action == "reuse":
        return ExpertResult(**{**prev["result"], "skipped": True})
    storage_path, run_name = _storage(cfg, name, fp)
    if decision.action == "redo":  # other fingerprints' checkpoints are of no use, nor this one's under --force
        clear_old_runs(cfg, name, None if decision.previous == fp.value else run_name)
    per_epoch, total = planned_steps(rows, tcfg)
    if total == 0:
        raise DataError(f"expert {name}: {len(rows)} rows give no batch of {tcfg.batch_size} on {tcfg.num_workers} worker(s)")
    saved_instruction = cfg.model.query_instruction
    if tcfg.instruction_mode == "pool" and not saved_instruction:
        saved_instruction = pool[0]
    log.info("[%s] %d rows, %d steps (%d per epoch), %d worker(s), %s, run %s-%s", name, len(rows), total, per_epoch,
             tcfg.num_workers, tcfg.strategy, name, fp)
    t0, started = time.perf_counter(), time.time()
    from stm_ray.train.rendezvous import torch_config

    trainer = TorchTrainer(
        train_loop,
        torch_config=torch_config(),  # the rendezvous listens on the node's address only
        train_loop_config={"train": tcfg.model_dump(), "model": cfg.model.model_dump(), "rows": ray.put(rows),
                           "total_steps": total, "expert": name, "instruction_pool": pool,
                           "saved_query_instruction": saved_instruction, "progress_actor": progress_actor},
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=tcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(tcfg.cpus_per_worker)}}),
    )
    result = trainer.fit()
    wall, finished = time.perf_counter() - t0, time.time()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        if state["step"] != total or not (Path(d) / MODEL_DIR).is_dir():
            raise RuntimeError(f"expert {name}: the last checkpoint is at step {state['step']} of {total} without a model")
        with atomic_dir(out) as tmp:
            shutil.copytree(Path(d) / MODEL_DIR, tmp, dirs_exist_ok=True)
            _stamp(tmp, fp)
    secs = state["step_seconds"][1:] or state["step_seconds"]
    sps = tcfg.batch_size * len(secs) / sum(secs) if secs and sum(secs) > 0 else 0.0
    tasks = sorted(set(rows.tasks))
    dev = _dev_ndcg(reference(out), tasks, cfg) if tcfg.evaluate_dev else {}
    res = ExpertResult(name=name, path=str(out), rows=len(rows), steps=state["step"],
                       final_loss=float(np.mean(state["loss"][-max(1, min(10, len(state["loss"]))):])),
                       samples_per_s=sps, wall_s=wall, resumed_from=state["resumed_from"], dev_ndcg_at_10=dev,
                       started_at=started, finished_at=finished, fingerprint=fp.value,
                       peak_memory_gib=state.get("peak_memory_gib"))
    _plot_loss(state["loss"], out / "loss.png", f"expert {name}")
    atomic_write_json(out / "metrics.json", {"result": asdict(res), "loss": state["loss"], "lr": state["lr"],
                                             "step_seconds": state["step_seconds"], "world_size": state["world_size"],
                                             **fp.record(), "config": {"train": tcfg.model_dump(),
                                                                      "model": cfg.model.model_dump()}})
    log.info("[%s] done: %d steps, loss %.4f, %.1f samples/s, dev NDCG@10 %s -> %s", name, res.steps, res.final_loss,
             sps, dev, out)
    return res


def _stamp(folder: Path, fp: Fingerprint) -> None:
    """Record the producing fingerprint in the model folder's stm_ray.json (what model_fingerprint reads)."""
    from stm_ray.modeling.embedder import META_FILE

    path = folder / META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta["fingerprint"] = fp.value
    path.write_text(json.dumps(meta, indent=2) + "\n")


def current_experts(run_dir: str | Path) -> dict[str, str]:
    """{name: folder} of the experts of the run's last training (``experts/summary.json``); folders left from
    an earlier config that the summary does not list are not the run's experts."""
    root = run_path(run_dir) / "experts"
    try:
        listed = json.loads((root / "summary.json").read_text()).get("experts") or []
    except (OSError, ValueError):
        listed = None
    names = [e["name"] for e in listed] if listed is not None else [p.parent.name for p in root.glob("*/metrics.json")]
    found = {n: str((root / n).resolve()) for n in sorted(names) if (root / n / "metrics.json").is_file()}
    stale = sorted(p.parent.name for p in root.glob("*/metrics.json") if p.parent.name not in found)
    if stale:
        log.warning("expert folder(s) %s are not experts of this run's training (another config); left out", stale)
    return found


def _progress_loop(actor, names: list[str], done: threading.Event, show: bool) -> None:
    import ray
    from tqdm.auto import tqdm

    if not show:
        done.wait()
        return
    bars: dict[str, Any] = {}
    while True:
        finished = done.wait(1.0)
        try:
            snap = ray.get(actor.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress display must never fail the run
            snap = {}
        for name in names:
            s = snap.get(name)
            if not s:
                continue
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=s["total"], desc=f"train {name}", position=len(bars), unit="step",
                                        dynamic_ncols=True, mininterval=1.0)
            if bar.n >= bar.total:
                continue
            bar.n = s["step"]
            bar.set_postfix(loss=f"{s['loss']:.4f}", sps=f"{s['samples_per_s']:.1f}", refresh=False)
            bar.refresh()
        if finished:
            for bar in bars.values():
                bar.close()
            return


def train_experts(cfg, *, shards: str | None = None, only: list[str] | None = None,
                  show_progress: bool = True,
                  on_finished: Callable[[ExpertResult], None] | None = None) -> list[ExpertResult]:
    """Train every expert found in the shards, concurrently as far as the Ray cluster's resources allow.

    Each expert is its own Ray Train run (``cfg.train.num_workers`` workers); runs that do not fit wait for
    resources. Each expert follows the stage contract (:func:`decide_expert`): reused when its ``metrics.json``
    records the same fingerprint, resumed from its last checkpoint when unfinished, retrained when the
    fingerprint differs. Returns one :class:`ExpertResult` per expert and writes ``<run_dir>/experts/summary.json``.
    ``on_finished(result)`` is called for an expert that finishes while others still train and none waits for its
    resources (the pipeline evaluates it there, on the CPUs it freed).
    """
    import ray

    tcfg = cfg.train
    source = shards or str(training_shards(cfg))
    report = DataReport()
    table = read_shards(source, strict=cfg.data.strict, report=report)
    groups = expert_groups(table, tcfg.experts)
    if only:
        missing = [n for n in only if n not in groups]
        if missing:
            raise DataError(f"unknown expert(s) {missing}; experts: {sorted(groups)}")
        groups = {n: groups[n] for n in only}
    pool = load_instruction_pool(tcfg.instruction_pool)
    log.info("%d expert(s) from %s (%d rows%s): %s", len(groups), source, table.num_rows,
             f", {len(report.problems)} bad rows skipped" if report.problems else "",
             ", ".join(f"{n} ({t.num_rows})" for n, t in groups.items()))
    decided = {}
    for n, t in groups.items():
        rows = TrainRows.from_table(t, tcfg.negative_sources, scores=tcfg.distill is not None)
        if len(rows) == 0:
            raise DataError(f"expert {n}: no training rows")
        if tcfg.distill is not None:
            log.info("expert %s: %d of %d rows have teacher scores (train.distill %s; the others: InfoNCE only)",
                     n, rows.scored, len(rows), tcfg.distill.loss)
            if rows.scored == 0:
                log.warning("expert %s: train.distill is set and no row has teacher scores", n)
        decided[n] = decide_expert(cfg, n, rows, pool)
    todo = [n for n, (_, d, _) in decided.items() if d.action != "reuse"]
    results_by_name = {n: ExpertResult(**{**prev["result"], "skipped": True})
                       for n, (_, d, prev) in decided.items() if d.action == "reuse"}
    if todo:
        init_local_ray()
        actor_name = f"stm-train-progress-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(TrainProgress).options(name=actor_name, num_cpus=0).remote()
        done = threading.Event()
        watcher = threading.Thread(target=_progress_loop, args=(actor, todo, done, show_progress), daemon=True)
        watcher.start()
        try:
            slots = tcfg.max_parallel_experts or len(todo)
            with ThreadPoolExecutor(max_workers=slots) as ex:
                futures = {ex.submit(train_expert, cfg, n, groups[n], pool=pool, progress_actor=actor_name,
                                     decided=decided[n]): n for n in todo}
                for f in as_completed(futures):
                    results_by_name[futures[f]] = result = f.result()
                    unfinished = sum(not g.done() for g in futures)
                    if on_finished is not None and 0 < unfinished < slots:  # others train, none waits
                        on_finished(result)
        finally:
            done.set()
            watcher.join(timeout=15)
            ray.kill(actor)
    results = [results_by_name[n] for n in groups]
    path = run_path(cfg.run_dir) / "experts" / "summary.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    kept = [e for e in previous.get("experts", []) if only and e.get("name") not in groups]
    summary = {"experts": kept + [asdict(r) for r in results], "shards": str(source), "bad_rows": report.counts()}
    if tcfg.evaluate_dev:
        tasks = sorted({t for r in results for t in r.dev_ndcg_at_10})
        base = previous.get("base") or {}
        if not todo and base.get("model") == cfg.model.name_or_path and set(base.get("dev_ndcg_at_10", {})) == set(tasks):
            summary["base"] = base
        elif tasks:
            init_local_ray()
            summary["base"] = {"model": cfg.model.name_or_path, "dev_ndcg_at_10": _dev_ndcg(cfg.model.name_or_path,
                                                                                            tasks, cfg)}
    atomic_write_json(path, summary)
    return results


class TrainProgress:
    """Latest step, loss and throughput per expert, pushed by each run's rank-0 worker (a Ray actor)."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, expert: str, **kw: Any) -> None:
        self.state[expert] = kw

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.state


def summary_table(results: list[ExpertResult], base: dict[str, float | None] | None = None) -> str:
    from stm_ray.tables import format_table

    rows = []
    for task, v in (base or {}).items():
        rows.append({"model": "base", "task": task, "steps": "", "loss": "", "samples/s": "", "dev NDCG@10": v})
    for r in results:
        for task, v in (r.dev_ndcg_at_10 or {"-": None}).items():
            rows.append({"model": r.name, "task": task, "steps": r.steps, "loss": f"{r.final_loss:.4f}",
                         "samples/s": f"{r.samples_per_s:.1f}", "dev NDCG@10": v})
    return format_table(rows, ["model", "task", "steps", "loss", "samples/s", "dev NDCG@10"])
