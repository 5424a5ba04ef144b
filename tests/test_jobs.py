"""`ray job submit` of the whole loop to a real Ray head (`ray start --head` on 127.0.0.1), as on a cluster.

The head is this test's own: its own temp dir and ports, 4 logical CPUs (room for two vLLM engine actors, so the
synthesis pool can scale from 1 to 2), the dashboard (the job server) on 127.0.0.1 only. It is stopped by killing
exactly the processes of that session, never with `ray stop` (which would also stop the test session's Ray).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import free_ports
from tests.cluster_scenarios import make_tasks

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _session_pids(temp_dir: str) -> list[int]:
    """Every process of the Ray session under ``temp_dir``: its daemons (their command lines name the dir) and
    their descendants (workers, the job supervisor and driver)."""
    import psutil

    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    pids = set()
    for p in roots:
        pids.add(p.pid)
        try:
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return sorted(pids)


def _wait_for_job_agent(address: str, env: dict, timeout: float = 120) -> None:
    """`ray start` returns before the head's job agent has registered; a submission until then fails with
    "No available agent to submit job, please try again later". Submit a no-op job until one is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        proc = _ray("job", "submit", "--address", address, "--no-wait", "--", "true", env=env, check=False)
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            raise AssertionError(f"the test head does not accept jobs:\n{proc.stdout}\n{proc.stderr}")
        time.sleep(2)


def _submit(address: str, env: dict, sub_id: str, overrides: list[str], *extra: str, wait: bool) -> str:
    """`ray job submit` of jobs/pipeline.py with jobs/configs/local.yaml, the working dir and the runtime env."""
    proc = _ray("job", "submit", "--address", address, "--submission-id", sub_id, *([] if wait else ["--no-wait"]),
                "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
                "python", "jobs/pipeline.py", "jobs/configs/local.yaml", *overrides, *extra, env=env,
                timeout=1200 if wait else 120)
    return proc.stdout + proc.stderr


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 started with `ray start --head`; yields (dashboard address, env)."""
    temp_dir = tempfile.mkdtemp(prefix="stmray-")  # short: Ray's socket paths must fit in 107 bytes
    # Every port its own: the agents' defaults (e.g. 52365) are taken when another Ray runs on the machine, such
    # as the test session's in-process one, and a head whose job agent cannot bind never accepts a job.
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_worker_niceness": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
           # token authentication, as on a shared cluster: the job server refuses requests without the token
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats", env=env,
         timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_agent(address, env)
        yield address, env, temp_dir
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_pids(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        left = _session_pids(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived: {left}"


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> list[Path]:
    """Two small BEIR tasks (two data sources: two experts). The first has four phrasings per document."""
    return make_tasks(tmp_path_factory.mktemp("jobs_tasks"), forms=4)


def test_ray_job_submit_runs_a_stage(ray_head, two_tasks, tiny_bert_dir, tmp_path):
    """The fast tier's `ray job submit`: the job mechanics (working dir, runtime env, token auth, the job's logs,
    its manifest) on one cheap stage; the whole loop through jobs and its rerun rule are the slow test below."""
    address, env, _ = ray_head
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"data.tasks=[beir:{two_tasks[0]},beir:{two_tasks[1]}]",
                 f"model.name_or_path={tiny_bert_dir}", "model.batch_size=16"]
    sub_id = f"stm-test-eval-{os.getpid()}-{int(time.time())}"
    out = _submit(address, env, sub_id, overrides, "--stages", "evaluate", wait=True)
    assert "succeeded" in out.lower(), out[-4000:]
    logs = _ray("job", "logs", "--address", address, sub_id, env=env).stdout
    assert "[1/1] evaluate: started" in logs and "[1/1] evaluate: done" in logs and "stm_ray from " in logs
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["evaluate"]["status"] == "done" and manifest["config"]["run_dir"] == str(run)
    assert len(list((run / "eval" / "base").glob("*.json"))) == 2
    assert list((run / "logs").glob("*-run.log"))  # the job's own log file, in the run


@pytest.mark.slow  # ~6 min: four jobs (the loop, a rerun, two changed fields); the fast tier submits one stage
def test_ray_job_submit_runs_the_pipeline(ray_head, two_tasks, tiny_bert_dir, tmp_path):
    address, env, _ = ray_head
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"data.tasks=[beir:{two_tasks[0]},beir:{two_tasks[1]}]", "data.max_queries=null",
                 f"model.name_or_path={tiny_bert_dir}", "model.batch_size=16",
                 # mined negatives only: vLLM generation inside a job is the slow tier's test below (and
                 # tests/test_synth_ray.py's); here the job mechanics and every stage's artifacts
                 "synth.max_rows=null", "synth.synthetic_per_query=0", "synth.instruction_pool_size=0",
                 "synth.miners=[bm25]", "synth.mine_depth=5", "synth.shard_size=16", "synth.expert_by=task",
                 # eval.early off: the rerun rule's outcome below is exact (an expert evaluated early by the
                 # train stage would make the evaluate stage reuse its files; tests/test_pipeline.py covers that)
                 "eval.early=false",
                 "train.batch_size=4", "train.max_steps=3", "train.evaluate_dev=false", "train.checkpoint_every=100",
                 "search.dev_corpus_size=8", "search.dev_pool_depth=2", "search.cpus_per_trial=1",
                 "merge.searcher=grid", "merge.methods=[linear]", "merge.weight_grid=[1.0]"]
    sub_id = f"stm-test-{os.getpid()}-{int(time.time())}"
    assert sub_id in _submit(address, env, sub_id, overrides, wait=False)

    deadline, status = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        proc = _ray("job", "status", "--address", address, sub_id, env=env)
        status = (proc.stdout + proc.stderr).upper()  # "Job 'x' succeeded"
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(5)
    logs = _ray("job", "logs", "--address", address, sub_id, env=env).stdout
    assert "SUCCEEDED" in status, f"job did not succeed:\n{status}\n--- logs (tail) ---\n{logs[-6000:]}"

    # progress in `ray job logs`: every stage started and finished, synthesis reported its rows
    for i, stage in enumerate(["synthesize", "train", "instructions", "merge", "evaluate"], start=1):
        assert f"[{i}/5] {stage}: started" in logs and f"[{i}/5] {stage}: done" in logs, stage
    assert "synthesize: " in logs and "rows (100%)" in logs
    assert "stm_ray from " in logs

    # artifacts
    manifest = json.loads((run / "manifest.json").read_text())
    assert {n: s["status"] for n, s in manifest["stages"].items()} == {
        "queries": "skipped", "synthesize": "done", "train": "done", "rerankers": "skipped", "teacher": "skipped",
        "instructions": "done",
        "merge": "done",
        "evaluate": "done", "rerank": "skipped", "serve": "pending"}
    assert manifest["versions"]["ray"] and manifest["config"]["run_dir"] == str(run)
    assert list((run / "synth").rglob("part-*.parquet"))
    assert sorted(manifest["stages"]["train"]["counts"]["experts"]) == sorted(
        p.name for p in (run / "experts").iterdir() if (p / "metrics.json").is_file())
    assert len(manifest["stages"]["train"]["counts"]["experts"]) == 2
    assert (run / "merged" / "merge.json").is_file() and (run / "search" / "instructions.json").is_file()
    table = manifest["stages"]["evaluate"]["counts"]["ndcg_at_10"]
    assert set(table) == {"base", "merged", *(f"expert-{n}" for n in manifest["stages"]["train"]["counts"]["experts"])}
    for label in table:
        assert len(list((run / "eval" / label).glob("*.json"))) == 2
    # the report: the headline table, the merge winner, throughput, and its three plots (non-empty PNGs)
    report = (run / "report.md").read_text()
    assert re.search(r"\| mean +\|", report) and "expert-" in report and "Winner:" in report and "samples/s" in report
    for png in ("ndcg_per_task", "merge_trials", "throughput"):
        assert f"report/{png}.png" in report
        assert (run / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resubmitting the finished run does nothing: every stage reuses its outputs (same fingerprints)
    sub2 = sub_id + "-again"
    _submit(address, env, sub2, overrides, wait=True)
    logs2 = _ray("job", "logs", "--address", address, sub2, env=env).stdout
    assert logs2.count("(reused)") == 5, logs2[-3000:]
    again = json.loads((run / "manifest.json").read_text())
    assert [again["stages"][n]["action"] for n in ("synthesize", "train", "instructions", "merge", "evaluate")] == [
        "reused"] * 5

    # The stage contract, one rule everywhere: a training field redoes the experts, the merge and the evaluations
    # of the changed models; synthesis, the base model's instruction search and its evaluation are reused.
    shards = {p: p.stat().st_mtime_ns for p in (run / "synth").rglob("part-*.parquet")}
    _submit(address, env, sub_id + "-lr", [*overrides, "train.learning_rate=0.001"], wait=True)
    lr = json.loads((run / "manifest.json").read_text())
    acts = {n: lr["stages"][n]["action"] for n in ("synthesize", "train", "instructions", "merge", "evaluate")}
    assert acts["synthesize"] == acts["instructions"] == "reused" and acts["train"] == acts["merge"] == "redone", acts
    items = {i["item"]: i["action"] for i in lr["stages"]["evaluate"]["items"]}
    assert {k.split(" on ")[0] for k, a in items.items() if a == "reuse"} == {"base"}
    assert {k.split(" on ")[0] for k, a in items.items() if a == "redo"} == {
        "merged", *(f"expert-{n}" for n in lr["stages"]["train"]["counts"]["experts"])}
    assert all(any(c.startswith("train.learning_rate: ") for c in i["changed"]) for i in lr["stages"]["train"]["items"])
    assert {p: p.stat().st_mtime_ns for p in shards} == shards  # synthesis wrote nothing
    # an evaluation field: evaluation only
    _submit(address, env, sub_id + "-k", [*overrides, "train.learning_rate=0.001", "eval.top_k=20"], wait=True)
    ev = json.loads((run / "manifest.json").read_text())
    assert {n: ev["stages"][n]["action"] for n in ("synthesize", "train", "instructions", "merge", "evaluate")} == {
        "synthesize": "reused", "train": "reused", "instructions": "reused", "merge": "reused", "evaluate": "redone"}


@pytest.mark.slow
def test_synthesis_pool_scales_up(ray_head, two_tasks, tiny_bert_dir, tiny_llama_dir, tmp_path):
    """A synthesis job with enough generation for a second vLLM engine to be worth starting: Ray Data's pool grows
    from its minimum (1) to its maximum (2) and never past it."""
    address, env, _ = ray_head
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"data.tasks=[beir:{two_tasks[0]},beir:{two_tasks[1]}]", "data.max_queries=null",
                 f"model.name_or_path={tiny_bert_dir}", f"synth.generator={tiny_llama_dir}", "synth.max_rows=null",
                 "synth.synthetic_per_query=6", "synth.max_new_tokens=128", "synth.max_model_len=512",
                 "synth.mine_depth=5", "synth.min_words=1", "synth.batch_size=2", "synth.max_concurrent_batches=1",
                 "synth.max_num_seqs=2", "synth.concurrency=[1,2]", "synth.instruction_pool_size=0",
                 "synth.expert_by=task"]
    sub_id = f"stm-test-scale-{os.getpid()}-{int(time.time())}"
    _submit(address, env, sub_id, overrides, "--stages", "synthesize", wait=True)
    manifest = json.loads((run / "manifest.json").read_text())
    pools = manifest["stages"]["synthesize"]["counts"]["actor_pools"]
    engine = next(p for name, p in pools.items() if "vllm" in name.lower())
    alive = [a for _, a, _ in engine["timeline"]]
    assert alive[0] == 1 and max(alive) == 2 and all(1 <= a <= 2 for a in alive), engine["timeline"]
