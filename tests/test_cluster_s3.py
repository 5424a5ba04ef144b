"""The loop on a multi-node Ray cluster with an S3 run directory: a head that schedules nothing and two worker
nodes (`ray start`, each its own HOME, and its own mount namespace in which the head's folder is empty), an S3 API
server (moto's server mode) on 127.0.0.1. The object store is the run directory: nothing is shared but the store.

Fast tier: the loop (synthesize, train, merge, evaluate) with run_dir=s3://..., every artifact on the store, a
second driver with an empty cache reusing everything, a redo leaving no stale object, a second run refused by
the lock. Node kills and the autoscaler are the slow tier's (tests/test_cluster_faults.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster import REPO
from tests.cluster_scenarios import driver_env, make_tasks, run_driver, scenario_loop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_tasks(cluster):
    return make_tasks(cluster.root / "data")


@pytest.fixture(scope="module")
def model_dir(cluster, tiny_bert_dir):
    """The tiny model in a folder every node sees (a model in the image)."""
    import shutil

    dest = cluster.root / "models" / "tiny-bert"
    if not dest.exists():
        shutil.copytree(tiny_bert_dir, dest)
    return str(dest)


@pytest.mark.slow  # ~2.5 min: three nodes and an S3 server; with the fault tests (test_cluster_faults.py) in the slow tier
def test_loop_on_three_nodes_with_an_s3_run_dir(cluster, s3, two_tasks, model_dir):
    head = cluster.head_home
    # the worker nodes cannot see the head's folders (what a real cluster's nodes cannot either)
    probe = ("import ray, os; ray.init(); f = ray.remote(num_cpus=1)(lambda p: (os.environ['HOME'], "
             "tuple(os.listdir(p)) if os.path.isdir(p) else None)); "
             f"print(sorted(set(ray.get([f.remote({str(head)!r}) for _ in range(4)]))))")
    (head / "only-on-the-head").write_text("x")
    seen = subprocess.run([sys.executable, "-c", probe], env=driver_env(cluster, head), capture_output=True,
                          text=True, timeout=120)
    homes = eval(seen.stdout.strip().splitlines()[-1]) if seen.returncode == 0 else None  # noqa: S307 - our own print
    assert homes and {h for h, _ in homes} == {str(cluster.root / "node1"), str(cluster.root / "node2")}, seen.stderr
    assert all(listing == () for _, listing in homes), homes

    r = scenario_loop(cluster, s3, two_tasks, model_dir)
    assert r["returncode"] == 0, r["stderr_tail"]
    run, keys, manifest = r["run"], r["keys"], r["manifest"]
    stages = {n: st["status"] for n, st in manifest["stages"].items()}
    assert [stages[n] for n in ("synthesize", "train", "merge", "evaluate")] == ["done"] * 4, stages
    assert manifest["run_dir"] == run
    experts = sorted(manifest["stages"]["train"]["counts"]["experts"])
    assert len(experts) == 2
    # every artifact is on the store: shards, experts (completion marker last), Ray Train's checkpoints, the merge,
    # evaluation files, the report
    shards = [k for k in keys if k.startswith("runs/r1/synth/") and k.endswith(".parquet")]
    assert shards
    for e in experts:
        assert f"runs/r1/experts/{e}/.stm-ray-complete.json" in keys and f"runs/r1/experts/{e}/metrics.json" in keys
        assert any(k.startswith(f"runs/r1/train/{e}-") and "checkpoint_" in k for k in keys), e
    assert "runs/r1/merged/.stm-ray-complete.json" in keys and "runs/r1/merged/merge.json" in keys
    assert sum(k.startswith("runs/r1/eval/") for k in keys) >= 2 * 4
    assert "runs/r1/report.md" in keys and "runs/r1/.stm-ray-lock.json" not in keys
    # nothing is written outside the store but caches: the repo has no run folder, the nodes only caches
    assert not (REPO / "runs" / "r1").exists()
    for node in ("node1", "node2"):
        top = {p.name for p in (cluster.root / node).iterdir()}
        assert top <= {".cache", "ray-start.log", ".config", ".local", ".triton"}, (node, top)

    # a second driver on a fresh machine (an empty cache): the store is the truth, every stage is reused
    assert r["rerun_returncode"] == 0, r["rerun_stderr_tail"]
    assert r["rerun_actions"] == dict.fromkeys(("synthesize", "train", "merge", "evaluate"), "reused")
    # a redo removes what it replaces: new shards only, no stale object left to be read back
    assert r["redo_returncode"] == 0, r["redo_stderr_tail"]
    assert r["redo_on_store"] == r["redo_listed"] and len(r["redo_on_store"]) > len(shards)

    # `stm-ray serve --write-config` of the s3 run names the store's merged model, which any node fetches
    out = cluster.root / "serve.yaml"
    sv = run_driver(cluster, cluster.root / "head2", "serve", run, "--write-config", str(out))
    assert sv.returncode == 0, sv.stderr[-3000:]
    assert f"{run}/merged" in out.read_text()
