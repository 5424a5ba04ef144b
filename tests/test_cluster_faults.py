"""Nodes that disappear, on the local cluster of tests/cluster.py with an S3 run directory (slow tier):

- a worker node killed while an expert trains: Ray Train restarts the worker group on another node, which resumes
  from the latest checkpoint on the store; the expert finishes with all its steps;
- the node running the vLLM engine killed during synthesis: Ray Data restarts the actor elsewhere; no row of the
  plan is lost and none is written twice.
benchmarks/bench_cluster.py runs the same scenarios and records them."""

from __future__ import annotations

import shutil

import pytest

from tests.cluster import cluster_env
from tests.cluster_scenarios import (
    make_tasks,
    scenario_driver_restart,
    scenario_synth_node_kill,
    scenario_train_node_kill,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def shared(cluster, tiny_bert_dir, tiny_llama_dir):
    """Tasks and models in folders every node sees (the image's)."""
    models = cluster.root / "models"
    for name, src in (("tiny-bert", tiny_bert_dir), ("tiny-llama", tiny_llama_dir)):
        if not (models / name).exists():
            shutil.copytree(src, models / name)
    return make_tasks(cluster.root / "data"), str(models / "tiny-bert"), str(models / "tiny-llama")


def test_training_survives_its_node_and_resumes_from_the_store(cluster, s3, shared):
    tasks, model, _ = shared
    r = scenario_train_node_kill(cluster, s3, tasks, model)
    assert r.get("killed"), r
    assert r["returncode"] == 0, r.get("log_tail")
    assert r["steps"] == r["total_steps"]
    # it resumed (once at least), from the newest checkpoint the store had when the node died: the steps redone
    # are those after that checkpoint, fewer than the checkpoint interval
    assert r["resumed_from"] and r["resumed_from"][0] >= r["checkpoint_step_at_kill"] > 0, r
    assert r["resumed_from"][0] % r["checkpoint_every"] == 0


def test_synthesis_survives_the_engine_node_with_no_row_lost_or_duplicated(cluster, s3, shared):
    tasks, model, generator = shared
    r = scenario_synth_node_kill(cluster, s3, tasks, model, generator)
    assert r.get("killed"), r
    assert r["returncode"] == 0, r.get("log_tail")
    assert r["rows_lost"] == 0 and r["rows_duplicated"] == 0, r
    assert r["rows_written"] == r["rows_planned"]


def test_a_killed_driver_is_resumed_by_the_next_one(cluster, s3, shared):
    tasks, model, _ = shared
    r = scenario_driver_restart(cluster, s3, tasks, model)
    assert r["returncode"] == 0, r.get("stderr_tail")
    assert r["actions"] == {"synthesize": "reused", "train": "resumed"}, r
    assert r["steps"] == r["total_steps"] and r["resumed_from"] and r["resumed_from"][0] >= r["checkpoint_step_at_kill"]


def test_the_autoscaler_adds_nodes_for_the_synthesis_pool_and_removes_them(tmp_path_factory, s3, shared):
    """Ray's fake multi-node autoscaler on a head with no CPUs: the engine pool (synth.concurrency=[1,2]) makes it
    start 1-CPU nodes, which it removes once idle."""
    from tests.cluster import AutoscaledCluster
    from tests.cluster_scenarios import scenario_autoscaler

    tasks, model, generator = shared
    c = AutoscaledCluster(tmp_path_factory.mktemp("autoscaled"), cluster_env(s3)).start()
    try:
        r = scenario_autoscaler(c, s3, tasks, model, generator)
    finally:
        left = c.stop()
    assert r["returncode"] == 0, r["log_tail"]
    assert r["nodes_added"] >= 1 and r["nodes_removed"] >= 1, r
    assert not left, f"processes of the autoscaled cluster survived: {left}"
