"""``train_rerankers(cfg)``: one Ray Train run per reranker of ``rerank.rerankers``, concurrently, from the shards.

Layout under ``<run_dir>``::

    train/reranker-<name>-<fingerprint>/   Ray Train storage: checkpoints (a rerun with the same fingerprint resumes)
    rerankers/<name>/                      the reranker: a Hugging Face folder (LoRA merged) + stm_ray_reranker.json
    rerankers/<name>/metrics.json          loss curve, throughput, the fingerprint (reranker done)
    rerankers/summary.json                 one row per reranker

A training example is a group: one shard row's query, its positive (index 0) and ``rerank.negatives_per_query``
negatives sampled from the row's hard negatives (mined and LLM-written); slots the row cannot fill take other
queries' positives of the same global batch. Every worker computes the same plan from (rows, seed, epoch) and takes
its slice of each global batch, so the number of workers does not change what is learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_ray.config import RerankConfig
from stm_ray.data.shards import read_shards
from stm_ray.data.task import DataError, DataReport
from stm_ray.records import read_record
from stm_ray.stage import Decision, Fingerprint, fingerprint
from stm_ray.storage import run_path
from stm_ray.train.recipe import Recipe, TrainJob, adamw, decide_run, fit, run_trainers
from stm_ray.utils import atomic_write_json

log = logging.getLogger("stm_ray.rerank")


@dataclass
class RerankRows:
    """The training rows (plain lists: cheap through the object store)."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]

    def __len__(self) -> int:
        return len(self.queries)

    @classmethod
    def from_table(cls, table, max_rows: int | None = None, seed: int = 13) -> RerankRows:
        idx = np.arange(table.num_rows)
        if max_rows is not None and max_rows < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(len(idx), size=max_rows, replace=False))
            table = table.take(idx)
        return cls(queries=table.column("query").to_pylist(), positives=table.column("positive").to_pylist(),
                   negatives=[list(n or []) for n in table.column("negatives").to_pylist()])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for col in (self.queries, self.positives):
            h.update("\x1f".join(col).encode())
        h.update(json.dumps(self.negatives).encode())
        return h.hexdigest()[:16]


def plan(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each global batch of one epoch; the last short batch is completed with the epoch's first rows."""
    if n_rows == 0:
        return []
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    if n_rows < batch_size:
        return [perm]
    out = []
    for s in range(0, n_rows, batch_size):
        chunk = perm[s:s + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, perm[:batch_size - len(chunk)]])
        out.append(chunk)
    return out


def build_groups(rows: RerankRows, batch: np.ndarray, part: np.ndarray, n_neg: int, seed: int,
                 step: int) -> tuple[list[str], list[str]]:
    """(queries, documents) of the rows ``part`` of global batch ``batch``, ``1 + n_neg`` pairs per row in order:
    the positive, then negatives (the row's own first, then other rows' positives of the batch)."""
    qs, ds = [], []
    for i in part:
        i = int(i)
        rng = np.random.default_rng([seed, step, i])
        own = rows.negatives[i]
        negs = [own[j] for j in rng.permutation(len(own))[:n_neg]]
        if len(negs) < n_neg:
            others = [rows.positives[int(j)] for j in batch if int(j) != i and rows.positives[int(j)] != rows.positives[i]]
            negs += [others[j] for j in rng.permutation(len(others))[:n_neg - len(negs)]]
        while len(negs) < n_neg:  # a batch of one query with no negatives at all
            negs.append("")
        qs += [rows.queries[i]] * (1 + n_neg)
        ds += [rows.positives[i], *negs]
    return qs, ds


def group_loss(logits, n_neg: int, kind: str):
    """``softmax``: cross-entropy over each query's group (the positive first); ``bce``: pointwise binary CE."""
    import torch
    import torch.nn.functional as F

    g = logits.float().view(-1, 1 + n_neg)
    if kind == "softmax":
        return F.cross_entropy(g, torch.zeros(len(g), dtype=torch.long, device=g.device))
    labels = torch.zeros_like(g)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(g, labels)


def build_reranker(spec: dict[str, Any], instruction: str, device: str = "cpu"):
    from stm_ray.rerank.model import CrossEncoderReranker, LLMReranker

    if spec["kind"] == "llm":
        return LLMReranker.from_pretrained(spec["model"], max_length=spec["max_length"], device=device,
                                           instruction=instruction)
    return CrossEncoderReranker.from_pretrained(spec["model"], max_length=spec["max_length"], device=device)


# ---------------------------------------------------------------------------------------------- the worker

class RerankerRecipe(Recipe):
    """One reranker's recipe for the Ray Train loop (:mod:`stm_ray.train.recipe`): groups of a query's positive and
    negatives, micro-batches of whole groups with gradients accumulated. Its own keys of the config: ``spec``,
    ``fingerprint``."""

    kind, settings, unit, log = "reranker", RerankConfig, "queries", log

    def model(self):
        import torch

        spec = self.config["spec"]
        torch.manual_seed(self.cfg.seed)  # the cross-encoder's new head and LoRA start the same on every worker and rerun
        net = build_reranker(spec, self.cfg.instruction, str(self.device))
        if spec.get("lora") is not None:
            lo = spec["lora"]
            net.add_lora(r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"], target_modules=lo["target_modules"])
        self.net, self.lora = net, spec.get("lora") is not None
        return net

    def data(self, epoch: int) -> list:
        return plan(len(self.rows), self.cfg.batch_size, self.cfg.seed, epoch)

    def optimizer(self, params):
        warmup = int(round(self.cfg.warmup_ratio * self.total))
        return adamw(params, self.config["spec"]["learning_rate"], self.cfg.weight_decay, self.total, warmup)

    def step(self, model, batch, step: int):
        import torch

        rcfg, net, engine, n_neg = self.cfg, self.net, self.engine, self.cfg.negatives_per_query
        per = len(batch) // self.world
        qs, ds = build_groups(self.rows, batch, batch[self.rank * per:(self.rank + 1) * per], n_neg, rcfg.seed, step)
        # micro-batches of whole groups, gradients accumulated: the same update in the memory of one of them
        mb = min(rcfg.micro_batch or per, per)
        starts = list(range(0, per, mb))
        loss = torch.zeros((), device=self.device)
        for j, s0 in enumerate(starts):
            last = j == len(starts) - 1
            lo, hi = s0 * (1 + n_neg), min(s0 + mb, per) * (1 + n_neg)
            feats = {k: v.to(self.device) for k, v in net.tokenize(qs[lo:hi], ds[lo:hi]).items()}
            sync = model.no_sync() if engine is None and not last and hasattr(model, "no_sync") else nullcontext()
            with sync:
                with self.autocast:
                    logits = model(feats)
                part = group_loss(logits, n_neg, rcfg.loss) * ((hi - lo) / len(qs))
                if engine is not None:
                    engine.set_gradient_accumulation_boundary(last)
                    engine.backward(part, scale_wrt_gas=False)
                else:
                    part.backward()
            loss = loss + part.detach()
        return loss

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        self.net.eval()
        self.net.save(folder, extra_metadata={"reranker": self.name, "train_steps": state["step"],
                                              "fingerprint": self.config["fingerprint"]})


# ---------------------------------------------------------------------------------------------- the driver

@dataclass
class RerankerResult:
    name: str
    kind: str
    path: str
    rows: int = 0
    steps: int = 0
    final_loss: float | None = None
    queries_per_s: float | None = None
    wall_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    skipped: bool = False
    trained: bool = True
    fingerprint: str = ""
    peak_memory_gib: float | None = None


def reranker_fingerprint(cfg, spec, rows: RerankRows) -> Fingerprint:
    """What decides a reranker's weights: the rerank training fields, its spec, its rows and its base model."""
    from stm_ray.modeling import model_fingerprint

    return fingerprint("rerankers", cfg, {"spec": spec.model_dump(mode="json"), "rows": rows.fingerprint(),
                                          "base": model_fingerprint(spec.model)})


def total_steps(n_rows: int, rcfg, spec=None) -> int:
    per_epoch = len(plan(n_rows, rcfg.batch_size, rcfg.seed, 0))
    total = per_epoch * rcfg.epochs
    cap = (spec.max_steps if spec is not None else None) or rcfg.max_steps
    return min(total, cap) if cap else total


def decide_reranker(cfg, spec, rows: RerankRows) -> tuple[Fingerprint, Decision, dict | None]:
    """(fingerprint, decision, the finished reranker's metrics.json when there is one) by the stage contract."""
    fp = reranker_fingerprint(cfg, spec, rows)
    out = run_path(cfg.run_dir).resolve() / "rerankers" / spec.name
    return fp, *decide_run(cfg, fp, spec.name, out, f"reranker-{spec.name}")


def train_reranker(cfg, spec, rows: RerankRows, *, progress_actor: str | None = None,
                   decided: tuple[Fingerprint, Decision, dict | None] | None = None) -> RerankerResult:
    """Train one reranker (a TorchTrainer) into ``<run_dir>/rerankers/<name>``, by the stage contract: reuse a
    finished one with the same fingerprint, resume an unfinished one, redo one whose fingerprint changed
    (``decided``: what :func:`decide_reranker` already said)."""
    fp, decision, prev = decided or decide_reranker(cfg, spec, rows)
    if decision.action == "reuse":
        return RerankerResult(**{**prev["result"], "skipped": True})
    return fit(reranker_job(cfg, spec, rows, fp, decision), progress_actor)


def reranker_job(cfg, spec, rows: RerankRows, fp: Fingerprint, decision: Decision) -> TrainJob:
    """The Ray Train run of a reranker to train (``decision``: run, resume or redo) and what it writes when done:
    the reranker's folder, ``metrics.json``, ``loss.png``."""
    rcfg, prefix = cfg.rerank, f"reranker-{spec.name}"
    out = run_path(cfg.run_dir).resolve() / "rerankers" / spec.name
    total = total_steps(len(rows), rcfg, spec)
    if total == 0:
        raise DataError(f"reranker {spec.name}: no training rows")
    log.info("[reranker %s] %s from %s: %d rows, %d steps, %d worker(s), %s loss, run %s", spec.name, spec.kind,
             spec.model, len(rows), total, rcfg.num_workers, rcfg.loss, f"{prefix}-{fp}")
    return TrainJob(cfg, spec.name, f"reranker {spec.name}", prefix, fp, decision, RerankerRecipe, rcfg, rows=rows,
                    total=total, out=out, config={"spec": spec.model_dump(), "fingerprint": fp.value},
                    title=f"reranker {spec.name} ({rcfg.loss})",
                    result=lambda t: RerankerResult(**t.fields, kind=spec.kind, queries_per_s=t.rate))


def train_rerankers(cfg, *, shards: str | None = None, only: list[str] | None = None,
                    show_progress: bool = True) -> list[RerankerResult]:
    """Train every reranker of ``rerank.rerankers`` with ``train: true`` on the shards (``train.shards`` or
    ``<run_dir>/synth``), concurrently as far as the cluster allows; ``train: false`` ones are listed as they are.
    Writes ``<run_dir>/rerankers/summary.json``."""
    rcfg = cfg.rerank
    specs = [s for s in rcfg.rerankers if not only or s.name in only]
    if only and len(specs) != len(only):
        raise DataError(f"unknown reranker(s) {sorted(set(only) - {s.name for s in specs})}; "
                        f"rerankers: {[s.name for s in rcfg.rerankers]}")
    if not specs:
        raise DataError("no rerankers configured: set rerank.rerankers, e.g. rerank.rerankers=[cross-encoder,llm]")
    results: dict[str, RerankerResult] = {}
    todo = [s for s in specs if s.train]
    for s in specs:
        if not s.train:
            results[s.name] = RerankerResult(name=s.name, kind=s.kind, path=s.model, trained=False)
    if todo:
        source = shards or cfg.train.shards or str(run_path(cfg.run_dir) / "synth")
        report = DataReport()
        table = read_shards(source, strict=cfg.data.strict, report=report)
        rows = RerankRows.from_table(table, rcfg.max_rows, rcfg.seed)
        if len(rows) == 0:
            raise DataError(f"{source}: no training rows for the rerankers")
        log.info("%d reranker(s) from %s: %d rows%s", len(todo), source, len(rows),
                 f" ({len(report.problems)} bad rows skipped)" if report.problems else "")
        decided = {s.name: decide_reranker(cfg, s, rows) for s in todo}  # here: the stage's recorder sees them
        for s in [s for s in todo if decided[s.name][1].action == "reuse"]:
            results[s.name] = RerankerResult(**{**decided[s.name][2]["result"], "skipped": True})
        todo = [s for s in todo if s.name not in results]
    results.update(run_trainers([reranker_job(cfg, s, rows, *decided[s.name][:2]) for s in todo],
                                show_progress=show_progress))
    ordered = [results[s.name] for s in specs]
    path = run_path(cfg.run_dir) / "rerankers" / "summary.json"
    previous = (read_record(path, kind="rerankers summary") or {}).get("rerankers", [])
    kept = [r for r in previous if only and r.get("name") not in results]
    atomic_write_json(path, {"rerankers": kept + [asdict(r) for r in ordered]})
    return ordered


def current_rerankers(cfg) -> dict[str, str]:
    """{name: folder} of the configured rerankers whose trained folder matches the summary (or the given folder
    for ``train: false``); a configured reranker not trained yet is left out with a warning."""
    root = run_path(cfg.run_dir) / "rerankers"
    listed = {r["name"]: r for r in (read_record(root / "summary.json", kind="rerankers summary") or {}).get(
        "rerankers", [])}
    out = {}
    for s in cfg.rerank.rerankers:
        if not s.train:
            out[s.name] = s.model
        elif (root / s.name / "metrics.json").is_file() and s.name in listed:
            out[s.name] = str((root / s.name).resolve())
        else:
            log.warning("reranker %s is not trained yet (run the rerankers stage): left out", s.name)
    return out


def summary_table(results: list[RerankerResult]) -> str:
    from stm_ray.tables import format_table

    rows = [{"reranker": r.name, "kind": r.kind, "steps": r.steps if r.trained else "-",
             "loss": f"{r.final_loss:.4f}" if r.final_loss is not None else "-",
             "queries/s": f"{r.queries_per_s:.1f}" if r.queries_per_s else "-",
             "status": "given" if not r.trained else ("reused" if r.skipped else "trained"), "path": r.path}
            for r in results]
    return format_table(rows, ["reranker", "kind", "steps", "loss", "queries/s", "status", "path"])
