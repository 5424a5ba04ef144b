"""What happens to a run on a cluster, as scenarios on the local cluster of tests/cluster.py: the tests assert on
what they return, benchmarks/bench_cluster.py records it. Each drives `stm-ray` as a driver process on the head
node (what `ray job submit` runs there) against an S3 run directory, and kills nodes the way a cloud takes back a
spot instance (the node's raylet and every worker on it, at once)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.cluster import REPO, LocalCluster, Node, S3Server
from tests.conftest import DOCS, write_beir

FORMS = ("what is {}", "{} symptoms", "causes of {}", "{} treatment")


def make_tasks(root: Path, forms: int = 3) -> list[Path]:
    """Two small BEIR tasks (two data sources, two experts): the first with ``forms`` phrasings per document."""
    queries, rel = {}, {}
    for i, (title, _) in enumerate(DOCS.values(), start=1):
        for k, form in enumerate(FORMS[:forms]):
            queries[f"q{i}_{k}"] = form.format(title.lower())
            rel[f"q{i}_{k}"] = {f"d{i}": 1}
    a = write_beir(root / "alpha", queries=queries, qrels={"train": rel, "dev": rel, "test": rel})
    rel_b = {f"q{i}": {f"d{i}": 1} for i in range(1, 9)}
    b = write_beir(root / "beta", qrels={"train": rel_b, "dev": rel_b, "test": rel_b})
    return [a, b]


def loop_overrides(run_dir: str, tasks: list[Path], model: str) -> list[str]:
    """The loop on tiny data: mined negatives, two experts, a one-point merge."""
    return [f"run_dir={run_dir}", f"data.tasks=[{','.join(f'beir:{t}' for t in tasks)}]", "data.max_queries=null",
            f"model.name_or_path={model}", "model.batch_size=16",
            "synth.max_rows=null", "synth.synthetic_per_query=0", "synth.instruction_pool_size=0",
            "synth.miners=[bm25]", "synth.mine_depth=5", "synth.shard_size=16", "synth.expert_by=task",
            "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=2", "train.cpus_per_worker=1",
            "search.dev_corpus_size=8", "search.dev_pool_depth=2", "search.cpus_per_trial=1",
            "merge.searcher=grid", "merge.methods=[linear]", "merge.weight_grid=[0.5]"]


def generation_overrides(generator: str, *, concurrency: str) -> list[str]:
    """Synthesis with the tiny generator: two LLM negatives per pair, small batches, one thread per engine."""
    return [f"synth.generator={generator}", "synth.synthetic_per_query=2", "synth.max_new_tokens=48",
            "synth.max_model_len=512", "synth.min_words=1", "synth.batch_size=2", "synth.max_concurrent_batches=1",
            "synth.max_num_seqs=2", f"synth.concurrency={concurrency}", "synth.cpu_threads=1"]


def driver_env(cluster: LocalCluster, home: Path) -> dict[str, str]:
    return {**cluster.node_env(home), "RAY_ADDRESS": cluster.address}


def run_driver(cluster: LocalCluster, home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`stm-ray ARGS` as a driver on the head node with HOME ``home`` (its own cache)."""
    return subprocess.run([sys.executable, "-m", "stm_ray.cli", *args], env=driver_env(cluster, home), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_driver(cluster: LocalCluster, home: Path, *args: str, log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - the driver's log, read after it ends
    return subprocess.Popen([sys.executable, "-m", "stm_ray.cli", *args], env=driver_env(cluster, home), cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT)


def node_running(cluster: LocalCluster, marker: str) -> Node | None:
    """The worker node whose processes include one whose command line contains ``marker`` (a Ray actor's name)."""
    import psutil

    for node in cluster.nodes:
        if node.proc is None:
            continue
        try:
            for child in psutil.Process(node.proc.pid).children(recursive=True):
                if marker in " ".join(child.cmdline()):
                    return node
        except psutil.NoSuchProcess:
            continue
    return None


def _wait(pred, timeout: float, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return None


def scenario_loop(cluster: LocalCluster, s3: S3Server, tasks: list[Path], model: str) -> dict[str, Any]:
    """5a: the loop with run_dir=s3://..., then a second driver with an empty cache (everything reused), then a redo
    of synthesis (new shards only on the store)."""
    bucket = s3.create_bucket("stm-loop")
    run = f"{bucket}/runs/r1"
    ov = loop_overrides(run, tasks, model)
    t0 = time.perf_counter()
    first = run_driver(cluster, cluster.head_home, "run", "--no-progress", "--skip", "instructions", *ov)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"run": run, "returncode": first.returncode, "seconds": round(seconds, 1),
                           "stderr_tail": first.stderr[-6000:]}
    if first.returncode != 0:
        return out
    out["keys"] = s3.keys("stm-loop", "runs/r1")
    out["manifest"] = json.loads(s3.read("stm-loop", "runs/r1/manifest.json"))
    fresh = cluster.root / "head2"
    fresh.mkdir(exist_ok=True)
    again = run_driver(cluster, fresh, "run", "--no-progress", "--skip", "instructions", *ov)
    out["rerun_returncode"], out["rerun_stderr_tail"] = again.returncode, again.stderr[-4000:]
    if again.returncode == 0:
        m2 = json.loads(s3.read("stm-loop", "runs/r1/manifest.json"))
        out["rerun_actions"] = {n: m2["stages"][n].get("action") for n in ("synthesize", "train", "merge", "evaluate")}
    redo = run_driver(cluster, fresh, "run", "--no-progress", "--stages", "synthesize", *ov, "synth.shard_size=8")
    out["redo_returncode"], out["redo_stderr_tail"] = redo.returncode, redo.stderr[-4000:]
    if redo.returncode == 0:
        out["redo_listed"] = sorted(json.loads(s3.read("stm-loop", "runs/r1/synth/manifest.json"))["shards"])
        out["redo_on_store"] = sorted(k[len("runs/r1/synth/"):] for k in s3.keys("stm-loop", "runs/r1/synth")
                                      if k.endswith(".parquet"))
    return out


def _checkpoint_steps(s3: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    """{checkpoint folder: its step} of the Ray Train runs under ``prefix`` (from each train_state.json)."""
    steps = {}
    for k in s3.keys(bucket, prefix):
        if k.endswith("/train_state.json") and "/checkpoint_" in k:
            try:
                steps[k.rsplit("/", 1)[0]] = int(json.loads(s3.read(bucket, k))["step"])
            except (OSError, ValueError, KeyError):
                continue  # being written
    return steps


def _registered_steps(s3: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    """The checkpoints Ray Train has registered (named in its checkpoint_manager_snapshot.json on the store), with
    their steps: the ones a restarted worker group is given. An uploaded checkpoint whose report the controller has
    not processed yet is not among them (a node lost in that window costs one more interval)."""
    keys = s3.keys(bucket, prefix)
    snapshots = "".join(s3.read(bucket, k).decode() for k in keys if k.endswith("checkpoint_manager_snapshot.json"))
    return {d: st for d, st in _checkpoint_steps(s3, bucket, prefix).items() if d.rsplit("/", 1)[1] in snapshots}


def scenario_train_node_kill(cluster: LocalCluster, s3: S3Server, tasks: list[Path], model: str,
                             *, every: int = 40, steps: int = 400) -> dict[str, Any]:
    """5b: the worker node of a training expert is killed after its first checkpoint reached the store; Ray Train
    restarts the worker group on another node, which resumes from the store's latest checkpoint."""
    bucket = s3.create_bucket("stm-train-kill")
    run = f"{bucket}/r"
    ov = [*loop_overrides(run, tasks[:1], model), f"train.max_steps={steps}", "train.epochs=1000",
          f"train.checkpoint_every={every}", "train.evaluate_dev=false", "train.max_failures=3"]
    prep = run_driver(cluster, cluster.head_home, "run", "--no-progress", "--stages", "synthesize", *ov)
    out: dict[str, Any] = {"synthesize_returncode": prep.returncode}
    if prep.returncode != 0:
        return {**out, "stderr_tail": prep.stderr[-4000:]}
    log = cluster.root / "train-kill.log"
    t0 = time.perf_counter()
    driver = start_driver(cluster, cluster.head_home, "run", "--no-progress", "--stages", "train", *ov, log=log)
    first = _wait(lambda: _registered_steps(s3, "stm-train-kill", "r/train"), timeout=600)
    victim = node_running(cluster, "RayTrainWorker")
    at_kill = max((_registered_steps(s3, "stm-train-kill", "r/train") or first or {"": 0}).values())
    out.update({"checkpoint_step_at_kill": at_kill, "killed": victim.name if victim else None,
                "killed_after_s": round(time.perf_counter() - t0, 1)})
    if victim is not None:
        cluster.kill_node(victim)
        cluster.add_node(f"{victim.name}-replacement", cpus=1)  # the cloud brings a new spot node
    rc = driver.wait(timeout=900)
    out.update({"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "log_tail": log.read_text()[-4000:]})
    if rc == 0:
        name = next(k.split("/")[2] for k in s3.keys("stm-train-kill", "r/experts") if k.endswith("/metrics.json"))
        metrics = json.loads(s3.read("stm-train-kill", f"r/experts/{name}/metrics.json"))
        out.update({"expert": name, "steps": metrics["result"]["steps"], "total_steps": steps,
                    "resumed_from": metrics["result"]["resumed_from"], "checkpoint_every": every})
    return out


def scenario_synth_node_kill(cluster: LocalCluster, s3: S3Server, tasks: list[Path], model: str,
                             generator: str) -> dict[str, Any]:
    """5c: the node running the vLLM engine actor is killed once the first shards reached the store; Ray Data
    restarts the actor elsewhere and redoes the lost work. Counts the rows planned, written, lost and written
    twice."""
    bucket = s3.create_bucket("stm-synth-kill")
    run = f"{bucket}/r"
    ov = [*loop_overrides(run, tasks, model), *generation_overrides(generator, concurrency="[1,1]"),
          "synth.shard_size=4"]
    log = cluster.root / "synth-kill.log"
    t0 = time.perf_counter()
    driver = start_driver(cluster, cluster.head_home, "run", "--no-progress", "--stages", "synthesize", *ov, log=log)
    shards = _wait(lambda: [k for k in s3.keys("stm-synth-kill", "r/synth") if k.endswith(".parquet")], timeout=600)
    victim = node_running(cluster, "InProcessVLLM")
    out: dict[str, Any] = {"killed": victim.name if victim else None, "shards_at_kill": len(shards or []),
                           "killed_after_s": round(time.perf_counter() - t0, 1)}
    if victim is not None:
        cluster.kill_node(victim)
        cluster.add_node(f"{victim.name}-replacement", cpus=1)
    rc = driver.wait(timeout=900)
    out.update({"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "log_tail": log.read_text()[-4000:]})
    if rc != 0:
        return out
    import io

    import pyarrow.parquet as pq

    manifest = json.loads(s3.read("stm-synth-kill", "r/synth/manifest.json"))
    planned = {}
    for t in tasks:  # every train pair of every task is planned once (data.max_queries=null, synth.max_rows=null)
        for line in (t / "qrels" / "train.tsv").read_text().splitlines()[1:]:
            q, d, _ = line.split("\t")
            planned[(f"beir:{t}", q, d)] = 1
    written: dict[tuple, int] = {}
    for rel in manifest["shards"]:
        table = pq.read_table(io.BytesIO(s3.read("stm-synth-kill", f"r/synth/{rel}")))
        for task, q, d in zip(table.column("task").to_pylist(), table.column("query_id").to_pylist(),
                              table.column("positive_id").to_pylist(), strict=True):
            written[(task, q, d)] = written.get((task, q, d), 0) + 1
    out.update({"rows_planned": len(planned), "rows_written": sum(written.values()),
                "rows_lost": len(set(planned) - set(written)), "rows_duplicated": sum(n - 1 for n in written.values()),
                "duplicates_dropped": manifest["result"].get("duplicates_dropped", 0),
                "shards": len(manifest["shards"])})
    return out


def scenario_driver_restart(cluster: LocalCluster, s3: S3Server, tasks: list[Path], model: str,
                            *, every: int = 40, steps: int = 400) -> dict[str, Any]:
    """5d: the driver (the job) is killed while an expert trains, after a checkpoint reached the store, and run
    again (a resubmitted job, another head): synthesis is reused, training resumes from the store's checkpoint,
    and the manifest says so."""
    import os
    import signal

    bucket = s3.create_bucket("stm-restart")
    run = f"{bucket}/r"
    ov = [*loop_overrides(run, tasks[:1], model), f"train.max_steps={steps}", "train.epochs=1000",
          f"train.checkpoint_every={every}", "train.evaluate_dev=false"]
    log = cluster.root / "restart-1.log"
    t0 = time.perf_counter()
    driver = start_driver(cluster, cluster.head_home, "run", "--no-progress", "--stages", "synthesize,train", *ov,
                          log=log)
    first = _wait(lambda: _registered_steps(s3, "stm-restart", "r/train"), timeout=600)
    os.kill(driver.pid, signal.SIGKILL)  # no cleanup, no lock release: as a lost head node
    driver.wait(timeout=60)
    out: dict[str, Any] = {"checkpoint_step_at_kill": max((first or {"": 0}).values()),
                           "killed_after_s": round(time.perf_counter() - t0, 1)}
    second = run_driver(cluster, cluster.root / "head-restart", "run", "--no-progress", "--stages",
                        "synthesize,train", *ov)
    out.update({"returncode": second.returncode, "seconds": round(time.perf_counter() - t0, 1),
                "stderr_tail": second.stderr[-4000:]})
    if second.returncode == 0:
        m = json.loads(s3.read("stm-restart", "r/manifest.json"))
        out["actions"] = {n: m["stages"][n].get("action") for n in ("synthesize", "train")}
        name = next(iter(m["stages"]["train"]["counts"]["experts"]))
        res = m["stages"]["train"]["counts"]["experts"][name]
        out.update({"steps": res["steps"], "total_steps": steps, "resumed_from": res["resumed_from"]})
    return out


_NODE_WATCH = """
import json, os, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
t0 = time.time()
while not os.path.exists(sys.argv[2]):
    nodes = [{"id": n["NodeID"], "cpu": n["Resources"].get("CPU", 0)} for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"t": round(time.time() - t0, 1), "workers": [n["id"] for n in nodes if n["cpu"] > 0]}),
          flush=True)
    time.sleep(1)
"""


def scenario_autoscaler(cluster, s3: S3Server, tasks: list[Path], model: str, generator: str,
                        *, settle_s: float = 150) -> dict[str, Any]:
    """5e: on a head with no CPUs and Ray's fake multi-node autoscaler, synthesis asks for its engine pool
    (``synth.concurrency=[1,2]``): the autoscaler adds 1-CPU nodes for it and removes them once idle. A watcher
    records the alive worker nodes every second."""
    bucket = s3.create_bucket("stm-autoscale")
    run = f"{bucket}/r"
    ov = [*loop_overrides(run, tasks, model), *generation_overrides(generator, concurrency="[1,2]"),
          "synth.mine_concurrency=1"]
    stop = cluster.root / "watch.stop"
    watch_log = cluster.root / "watch.jsonl"
    watcher = subprocess.Popen([sys.executable, "-c", _NODE_WATCH, cluster.address, str(stop)],
                               env=driver_env(cluster, cluster.head_home), stdout=open(watch_log, "wb"),  # noqa: SIM115
                               stderr=subprocess.DEVNULL)
    time.sleep(3)
    log = cluster.root / "autoscale.log"
    t0 = time.perf_counter()
    driver = start_driver(cluster, cluster.head_home, "run", "--no-progress", "--stages", "synthesize", *ov, log=log)
    rc = driver.wait(timeout=1200)
    done_s = time.perf_counter() - t0

    def lines() -> list[dict]:
        out = []
        for line in watch_log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    _wait(lambda: (lines() and not lines()[-1]["workers"]), timeout=settle_s, every=2)
    stop.write_text("")
    watcher.wait(timeout=60)
    seen = lines()
    started = next((x["t"] for x in seen if x["workers"]), None)
    ids = {i for x in seen for i in x["workers"]}
    final = set(seen[-1]["workers"]) if seen else set()
    out: dict[str, Any] = {"returncode": rc, "seconds": round(done_s, 1), "log_tail": log.read_text()[-4000:],
                           "nodes_added": len(ids), "nodes_removed": len(ids - final),
                           "peak_workers": max((len(x["workers"]) for x in seen), default=0),
                           "first_node_up_s": round(started - seen[0]["t"] - 3, 1) if started is not None else None,
                           "timeline": [(x["t"], len(x["workers"])) for x in seen][::5]}
    if rc == 0:
        m = json.loads(s3.read("stm-autoscale", "r/manifest.json"))
        out["actor_pools"] = m["stages"]["synthesize"]["counts"].get("actor_pools")
    return out
