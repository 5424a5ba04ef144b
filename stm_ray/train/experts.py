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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stm_ray.data.shards import read_shards
from stm_ray.data.task import DataError, DataReport
from stm_ray.ray_setup import init_local_ray
from stm_ray.records import read_record
from stm_ray.stage import Decision, Fingerprint, fingerprint
from stm_ray.storage import reference, run_path
from stm_ray.train.batching import TrainRows, plan_batches
from stm_ray.train.recipe import Trained, TrainJob, decide_run, fit, run_trainers
from stm_ray.train.recipe import TrainProgress as TrainProgress
from stm_ray.utils import atomic_write_json

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


def decide_expert(cfg, name: str, rows: TrainRows, pool: list[str]) -> tuple[Fingerprint, Decision, dict | None]:
    """(fingerprint, decision, the finished expert's metrics.json when there is one) for expert ``name``."""
    fp = expert_fingerprint(cfg, rows, pool)
    return fp, *decide_run(cfg, fp, name, run_path(cfg.run_dir).resolve() / "experts" / name, name)


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
    pool = pool or []
    rows = TrainRows.from_table(table, cfg.train.negative_sources, scores=cfg.train.distill is not None)
    if len(rows) == 0:
        raise DataError(f"expert {name}: no training rows")
    fp, decision, prev = decided or decide_expert(cfg, name, rows, pool)
    if decision.action == "reuse":
        return ExpertResult(**{**prev["result"], "skipped": True})
    return fit(expert_job(cfg, name, rows, pool, fp, decision), progress_actor)


def expert_job(cfg, name: str, rows: TrainRows, pool: list[str], fp: Fingerprint, decision: Decision) -> TrainJob:
    """The Ray Train run of an expert to train (``decision``: run, resume or redo) and what it writes when done:
    the sentence-transformers folder (stamped with ``fp``), ``metrics.json``, ``loss.png``, dev NDCG@10."""
    from stm_ray.train.worker import ExpertRecipe

    tcfg = cfg.train
    out = run_path(cfg.run_dir).resolve() / "experts" / name
    per_epoch, total = planned_steps(rows, tcfg)
    if total == 0:
        raise DataError(f"expert {name}: {len(rows)} rows give no batch of {tcfg.batch_size} on {tcfg.num_workers} worker(s)")
    saved_instruction = cfg.model.query_instruction
    if tcfg.instruction_mode == "pool" and not saved_instruction:
        saved_instruction = pool[0]
    log.info("[%s] %d rows, %d steps (%d per epoch), %d worker(s), %s, run %s", name, len(rows), total, per_epoch,
             tcfg.num_workers, tcfg.strategy, f"{name}-{fp}")

    def result(t: Trained) -> ExpertResult:
        dev = _dev_ndcg(reference(out), sorted(set(rows.tasks)), cfg) if tcfg.evaluate_dev else {}
        log.info("[%s] %.1f samples/s, dev NDCG@10 %s", name, t.rate or 0.0, dev)
        return ExpertResult(**t.fields, samples_per_s=t.rate or 0.0, dev_ndcg_at_10=dev, started_at=t.started_at,
                            finished_at=t.finished_at)

    return TrainJob(cfg, name, name, name, fp, decision, ExpertRecipe, tcfg, rows=rows, total=total, out=out,
                    config={"model": cfg.model.model_dump(), "instruction_pool": pool,
                            "saved_query_instruction": saved_instruction},
                    title=f"expert {name}", result=result, stamp=True,
                    record={"world_size": tcfg.num_workers,
                            "config": {"train": tcfg.model_dump(), "model": cfg.model.model_dump()}})


def current_experts(run_dir: str | Path) -> dict[str, str]:
    """{name: folder} of the experts of the run's last training (``experts/summary.json``); folders left from
    an earlier config that the summary does not list are not the run's experts."""
    root = run_path(run_dir) / "experts"
    summary = read_record(root / "summary.json", kind="experts summary")
    listed = (summary.get("experts") or []) if summary is not None else None
    names = [e["name"] for e in listed] if listed is not None else [p.parent.name for p in root.glob("*/metrics.json")]
    found = {n: str((root / n).resolve()) for n in sorted(names) if (root / n / "metrics.json").is_file()}
    stale = sorted(p.parent.name for p in root.glob("*/metrics.json") if p.parent.name not in found)
    if stale:
        log.warning("expert folder(s) %s are not experts of this run's training (another config); left out", stale)
    return found


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
    decided, rows_of = {}, {}
    for n, t in groups.items():
        rows = TrainRows.from_table(t, tcfg.negative_sources, scores=tcfg.distill is not None)
        if len(rows) == 0:
            raise DataError(f"expert {n}: no training rows")
        if tcfg.distill is not None:
            log.info("expert %s: %d of %d rows have teacher scores (train.distill %s; the others: InfoNCE only)",
                     n, rows.scored, len(rows), tcfg.distill.loss)
            if rows.scored == 0:
                log.warning("expert %s: train.distill is set and no row has teacher scores", n)
        decided[n], rows_of[n] = decide_expert(cfg, n, rows, pool), rows
    todo = [n for n, (_, d, _) in decided.items() if d.action != "reuse"]
    results_by_name = {n: ExpertResult(**{**prev["result"], "skipped": True})
                       for n, (_, d, prev) in decided.items() if d.action == "reuse"}
    results_by_name.update(run_trainers([expert_job(cfg, n, rows_of[n], pool, *decided[n][:2]) for n in todo],
                                        show_progress=show_progress, max_parallel=tcfg.max_parallel_experts,
                                        on_finished=on_finished))
    results = [results_by_name[n] for n in groups]
    path = run_path(cfg.run_dir) / "experts" / "summary.json"
    previous = read_record(path, kind="experts summary") or {}
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
