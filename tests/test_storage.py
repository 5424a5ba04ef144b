"""Run directories on object storage, used directly (stm_ray.storage): exact sync both ways (a redo leaves no stale
object, a fresh cache takes nothing the store does not hold), folders put with their completion marker last, the
run lock, and one clear line for a store that cannot be used. file:// goes through the same pyarrow.fs code as
s3://; the S3 cases talk to a real S3 API server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stm_ray.config import load_config
from stm_ray.storage import (
    LOCK_FILE,
    MARKER,
    RunSession,
    RunStore,
    StoreError,
    check_run_dir,
    fetch_folder,
    run_path,
)
from stm_ray.utils import atomic_dir, atomic_write_json


@pytest.fixture(scope="module", autouse=True)
def s3_env(s3):
    """The module's S3 server (conftest), named by AWS_ENDPOINT_URL and credentials in this process."""
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    yield s3
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A node's cache: each test (and each "node" within one) gets its own."""
    def use(name: str = "node") -> Path:
        d = tmp_path / f"cache-{name}"
        monkeypatch.setenv("STM_RAY_CACHE", str(d))
        return d

    use()
    return use


def test_run_path_is_node_local_for_uris(cache):
    root = cache("a")
    assert run_path("s3://b/runs/x") == root / "runs" / "s3" / "b" / "runs" / "x"
    assert run_path("gcs://b/x") == root / "runs" / "gs" / "b" / "x"
    assert run_path("/abs/run") == Path("/abs/run")


def test_file_uri_pipeline_run_is_put_and_a_fresh_cache_reuses_it(tmp_path, cache, tiny_beir, tiny_bert_dir):
    from stm_ray.pipeline import run_pipeline

    remote = tmp_path / "bucket" / "runs" / "r1"
    uri = f"file://{remote}"
    cfg = load_config(None, [f"run_dir={uri}", f"data.tasks=[beir:{tiny_beir}]", f"model.name_or_path={tiny_bert_dir}"])
    m = run_pipeline(cfg, stages=["evaluate"], show_progress=False)
    assert m["run_dir"] == uri
    on_store = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert "manifest.json" in on_store and "config.yaml" in on_store and "report.md" in on_store
    assert any(p.startswith("eval/base/") for p in on_store) and LOCK_FILE not in on_store
    assert json.loads((remote / "manifest.json").read_text())["stages"]["evaluate"]["status"] == "done"

    # another node (an empty cache) takes the run from the store: the finished stage is reused
    cache("fresh")
    again = run_pipeline(cfg, stages=["evaluate"], show_progress=False)
    assert again["stages"]["evaluate"]["action"] == "reused"
    assert (run_path(uri) / "eval" / "base").is_dir()


def test_push_and_pull_are_exact(tmp_path, cache):
    uri = f"file://{tmp_path / 'remote'}"
    remote = tmp_path / "remote"
    with RunSession(uri) as s:
        local = s.store.local
        (local / "merged").mkdir(parents=True)
        (local / "merged" / "model.safetensors").write_bytes(b"a" * 10)
        (local / "search" / "scratch" / "t1").mkdir(parents=True)
        (local / "search" / "scratch" / "t1" / "x.bin").write_bytes(b"x")  # scratch: never put
        (local / "train").mkdir()
        (local / "train" / "ckpt").write_bytes(b"c")  # Ray Train's own (on the store itself): never mirrored
    assert (remote / "merged" / "model.safetensors").read_bytes() == b"a" * 10
    assert not (remote / "search").exists() and not (remote / "train").exists()
    store = RunStore(uri)
    assert store.push() == (0, 0)  # nothing changed since
    with RunSession(uri) as s:
        (s.store.local / "merged" / "model.safetensors").write_bytes(b"b" * 10)  # same size, new content
        (s.store.local / "old.json").write_text("{}")
    assert (remote / "merged" / "model.safetensors").read_bytes() == b"b" * 10
    with RunSession(uri) as s:
        (s.store.local / "old.json").unlink()  # a redo removed it: the store loses it too
    assert not (remote / "old.json").exists()

    # a stale file in another node's cache is removed by its pull; a changed one is fetched again
    cache("other")
    other = RunStore(uri)
    other.local.mkdir(parents=True)
    (other.local / "stale.parquet").write_bytes(b"s")
    assert other.pull() == (1, 1)
    assert not (other.local / "stale.parquet").exists()
    assert (other.local / "merged" / "model.safetensors").read_bytes() == b"b" * 10
    assert other.pull() == (0, 0)


def test_folders_are_put_with_a_marker_and_fetched_by_uri(tmp_path, cache, s3):
    bucket = s3.create_bucket("stm-folders")
    uri = f"{bucket}/run"
    with RunSession(uri) as s:
        with atomic_dir(s.store.local / "merged") as d:
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(b"w" * 100)
        atomic_write_json(s.store.local / "merged" / "merge.json", {"method": "linear"})  # put at once as well
        keys = s3.keys("stm-folders", "run/merged")
        assert f"run/merged/{MARKER}" in keys and "run/merged/merge.json" in keys
    cache("replica")
    folder = Path(fetch_folder(f"{uri}/merged"))
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.json", "merge.json", "model.safetensors"]
    from stm_ray.modeling.aliases import resolve_model

    assert resolve_model(f"{uri}/merged") == str(folder)
    with pytest.raises(FileNotFoundError, match="no complete folder"):
        fetch_folder(f"{uri}/experts/none")


def test_store_errors_are_one_line_naming_the_uri(cache, s3, tmp_path):
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/run: the bucket 'no-such-bucket' does not exist"):
        RunSession("s3://no-such-bucket/run").__enter__()
    bucket = s3.create_bucket("stm-newer")
    RunStore(f"{bucket}/run").write_json(".stm-ray-store.json", {"format": 99, "stm_ray": "9.0"})
    with pytest.raises(StoreError, match="written by a newer stm-ray"):
        RunSession(f"{bucket}/run").__enter__()
    # the CLI: exit 2 and the line, no traceback
    env = {**os.environ, "STM_RAY_CACHE": str(tmp_path / "cli-cache")}
    proc = subprocess.run([sys.executable, "-m", "stm_ray.cli", "train", "run_dir=s3://no-such-bucket/run"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "s3://no-such-bucket/run" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_run_on_the_same_run_dir_is_refused_and_a_stale_lock_taken_over(cache, s3):
    bucket = s3.create_bucket("stm-lock")
    uri = f"{bucket}/run"
    with RunSession(uri):
        code = f"from stm_ray.storage import RunSession\nRunSession({uri!r}).__enter__()"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "STM_RAY_CACHE": str(run_path("x").parent / "second")})
        assert proc.returncode != 0 and "is in use by another run" in proc.stderr
    assert RunStore(uri).read_json(LOCK_FILE) is None  # released
    # a lock whose owner died on another host (no heartbeat for long) is taken over
    RunStore(uri).write_json(LOCK_FILE, {"host": "gone-host", "pid": 1, "id": "dead", "heartbeat": time.time() - 600})
    with RunSession(uri) as s:
        assert RunStore(uri).read_json(LOCK_FILE)["id"] == s.lock.owner["id"]


def test_relative_run_dir_in_a_ray_job_is_refused(tmp_path, monkeypatch):
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(StoreError, match=r"relative.*run_dir=~/stm-ray-runs/local"):
        check_run_dir("runs/local")
    check_run_dir("/abs/runs/local")
    check_run_dir("~/stm-ray-runs/local")
    check_run_dir("s3://bucket/run")
    monkeypatch.chdir(tmp_path)
    check_run_dir("runs/local")  # a laptop's relative folder is fine


def test_hub_ids_are_pinned_to_a_revision_and_loaded_at_it(tmp_path, monkeypatch, tiny_bert_dir):
    """A hub id resolves to the revision it has at the start of the run (here from a hub cache laid out as
    huggingface_hub writes it, offline): the config carries org/name@commit, each node loads exactly that snapshot,
    and the fingerprint follows the revision."""
    import shutil

    from huggingface_hub import constants

    from stm_ray.modeling.aliases import model_fingerprint, pin, resolve_model
    from stm_ray.pipeline import pin_models

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-embed"
    for sha in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_bert_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert pin("acme/tiny-embed") == "acme/tiny-embed@" + "a" * 40
    assert pin("minilm") == "minilm" and pin(tiny_bert_dir) == tiny_bert_dir
    cfg = pin_models(load_config(None, ["model.name_or_path=acme/tiny-embed"]))
    assert cfg.model.name_or_path == "acme/tiny-embed@" + "a" * 40
    assert resolve_model(cfg.model.name_or_path) == str(repo / "snapshots" / ("a" * 40))
    before = model_fingerprint(cfg.model.name_or_path)
    (repo / "refs" / "main").write_text("b" * 40)  # upstream moved
    (repo / "snapshots" / ("b" * 40) / "config.json").write_text(
        (repo / "snapshots" / ("b" * 40) / "config.json").read_text().replace("32", "32 "))
    moved = pin_models(load_config(None, ["model.name_or_path=acme/tiny-embed"])).model.name_or_path
    assert moved.endswith("@" + "b" * 40) and model_fingerprint(moved) != before


def test_references_of_aliases_need_no_working_directory(tmp_path, cache, monkeypatch):
    """A Ray job's driver runs in Ray's copy of its working dir, which Ray may remove under it: handing an alias
    or hub id to other nodes must not resolve it against the working directory."""
    store = RunStore("s3://bucket/run")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert store.uri_of("minilm") == "minilm" and store.uri_of("org/model@abc") == "org/model@abc"
    assert store.uri_of(store.local / "experts" / "a") == "s3://bucket/run/experts/a"
    assert RunStore(str(tmp_path / "local-run")).uri_of("minilm") == "minilm"
