"""What the instruction and merge searches share: the stage contract for a Tune search, Ray Tune plumbing, searchers,
trial tables, plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stm_ray.records import read_record
from stm_ray.stage import Decision, Fingerprint, decide
from stm_ray.storage import dir_exists, is_remote, native_uri, remove_dir
from stm_ray.utils import save_figure

log = logging.getLogger(__name__)

METRIC = "objective"


def tune_storage(cfg) -> str:
    """Where Tune keeps the searches' experiments: the run's ``search/tune``, on the object store itself for a
    remote run (trials on any node write there)."""
    return native_uri(cfg.run_dir, "search/tune")


def decide_search(fp: Fingerprint, item: str, result: Path, tune_dir: str) -> tuple[Decision, dict[str, Any] | None]:
    """The stage contract for a Tune search: ``result`` (its JSON output) records the fingerprint; an unfinished
    search under the same fingerprint is its Tune experiment ``tune_dir``, resumed. Returns the decision and the
    finished result's record (None when there is none). Under ``--force`` the finished experiment is removed, so
    that the search really runs again."""
    record = read_record(result, kind="search result")
    finished = record
    if record is None and dir_exists(tune_dir):
        record = {"fingerprint": fp.value}
    decision = decide(fp, item, record, complete=finished is not None, where=str(result))
    if decision.action == "redo" and decision.previous == fp.value:
        remove_dir(tune_dir)
    return decision, finished


def searcher(kind: str, seed: int, points: list[dict[str, Any]] | None = None):
    """The Tune search algorithm for ``kind`` (optuna: TPE; random; grid: Tune's variant generator)."""
    if kind == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        from stm_ray import console

        if console.configured():  # a CLI command: optuna's lines go through our handlers (the log file)
            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

        return OptunaSearch(metric=METRIC, mode="max", points_to_evaluate=points or None,
                            sampler=optuna.samplers.TPESampler(seed=seed))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed if kind == "random" else None, points_to_evaluate=points or None)


def _trial_bar(total: int, desc: str):
    """A Tune callback: one progress bar over the search's trials (its ETA is the search's estimated time left),
    with the best dev NDCG@10 so far; Tune's own tables stay in the log (--verbose shows them)."""
    import sys

    from ray import tune
    from tqdm.auto import tqdm

    class TrialBar(tune.Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="trial", mininterval=0.5 if sys.stderr.isatty() else 30)
            self.best: float | None = None

        def _done(self, trial, result: dict[str, Any] | None = None) -> None:
            score = (result or trial.last_result or {}).get("ndcg_at_10")
            if score is not None and (self.best is None or score > self.best):
                self.best = score
            self.bar.update(1)
            if self.best is not None:
                self.bar.set_postfix(best_ndcg=f"{self.best:.4f}", refresh=False)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._done(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._done(trial)

        def on_experiment_end(self, trials, **info) -> None:
            self.bar.close()

    return TrialBar()


def run_tuner(trainable, *, param_space: dict[str, Any], kind: str, num_samples: int, seed: int,
              storage: str, name: str, resources: dict[str, float], max_concurrent: int,
              points: list[dict[str, Any]] | None = None, show_progress: bool = True, trials: int | None = None,
              desc: str = "trials"):
    """Run (or resume, when ``storage/name`` holds an interrupted run) a Tune experiment; returns its ResultGrid.
    ``trials`` (how many the search runs) sizes the progress bar; Tune's own tables only with --verbose."""
    from ray import tune

    from stm_ray import console

    callbacks = [_trial_bar(trials or num_samples, desc)] if show_progress else []
    verbose = 1 if show_progress and console.verbose() else 0

    if not is_remote(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    path = f"{storage.rstrip('/')}/{name}"
    wrapped = tune.with_resources(trainable, resources)
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the Tune experiment in %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=wrapped, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            wrapped, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher(kind, seed, points),
                                        num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()


def trial_rows(results, keys: list[str]) -> list[dict[str, Any]]:
    """One row per finished trial, in the order the trials started: its config values and scores."""
    rows = []
    for r in results:
        if r.error is not None or not r.metrics or METRIC not in r.metrics:
            rows.append({"error": str(r.error)[:300] if r.error else "no result", **{k: None for k in keys}})
            continue
        m = r.metrics
        row = {k: m.get(k) for k in keys}
        row |= {"ndcg_at_10": m["ndcg_at_10"], "recall_at_10": m["recall_at_10"], "started": m.get("started", 0.0),
                "seconds": m.get("seconds")}
        row |= {k: v for k, v in m.items() if k.startswith("ndcg/")}
        rows.append(row)
    done = sorted((r for r in rows if "error" not in r), key=lambda r: r["started"])
    for i, r in enumerate(done, 1):
        r["trial"] = i
    return done + [r for r in rows if "error" in r]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        errors = [r["error"] for r in rows][:3]
        raise RuntimeError(f"every trial failed; first errors: {errors}")
    return max(ok, key=lambda r: (round(r["ndcg_at_10"], 10), round(r["recall_at_10"], 10), -r["trial"]))


def plot_trials(rows: list[dict[str, Any]], path: Path, title: str, *, label_key: str | None = None,
                reference: dict[str, float] | None = None) -> None:
    """Score per trial (in order) with the best so far, and reference scores as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    xs = [r["trial"] for r in ok]
    ys = [r["ndcg_at_10"] for r in ok]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if label_key:
        groups = sorted({str(r.get(label_key)) for r in ok})
        for g in groups:
            pts = [(x, y) for x, y, r in zip(xs, ys, ok) if str(r.get(label_key)) == g]
            ax.scatter(*zip(*pts), s=14, label=g)
    else:
        ax.scatter(xs, ys, s=14, label="trial")
    ax.step(xs, best, where="post", color="black", lw=1.2, label="best so far")
    for i, (name, v) in enumerate((reference or {}).items()):
        if v is not None:
            ax.axhline(v, ls="--", lw=0.8, color=f"C{(i + 4) % 10}", label=name)
    ax.set_xlabel("trial")
    ax.set_ylabel("mean dev NDCG@10")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
