"""Every command that starts a local Ray keeps it on loopback: the setting is applied when stm_ray is imported,
before any of its code can import ray, and the serving replica's own gRPC port follows it."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: no loopback setting of ours, no cluster address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS",
                                                             "STM_RAY_SET_LOOPBACK")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_serve_command_listens_only_on_loopback(tiny_bert_dir):
    """`stm-ray serve` starts a local Ray and a Serve application: GCS, raylet, agents, controller, proxy and
    replica listen on loopback addresses only (before: all interfaces, and the replica's gRPC port on [::])."""
    import psutil

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stm_ray.cli", "serve", tiny_bert_dir, "--port", str(port)],
                            env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server did not come up")
        listening = []
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
        names = {n for n, _, _ in listening}
        assert len(listening) >= 6 and {"gcs_server", "raylet"} <= names, listening
        assert any("Replica" in n for n in names) and ("127.0.0.1" in {ip for _, ip, _ in listening}), listening
        exposed = [x for x in listening if not _is_loopback(x[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        # direct ingress (serve.ingress=auto, one replica): the replica itself listens on --port, Serve's proxy
        # on another loopback port
        on_port = {n for n, _, p in listening if p == port}
        assert len(on_port) == 1 and "Replica" in next(iter(on_port)), listening
        assert any("Proxy" in n for n, _, p in listening if p != port), listening
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.parametrize("entry", ["stm_ray.cli", "stm_ray.pipeline", "stm_ray.serve.deploy", "jobs/pipeline.py",
                                   "jobs/train.py"])
def test_every_entry_turns_ray_cluster_mode_off_before_ray_is_imported(entry):
    load = (f"import runpy; runpy.run_path({str(REPO / entry)!r}, run_name='not_main')" if entry.endswith(".py")
            else f"import {entry}")
    code = f"{load}; import ray; from ray._private import ray_constants as c; print('CLUSTER', c.ENABLE_RAY_CLUSTER)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=300,
                         cwd=REPO)
    assert "CLUSTER False" in out.stdout, out.stderr[-2000:]


def test_joining_a_cluster_keeps_ray_cluster_mode():
    """A driver that joins a cluster needs its own network address: RAY_ADDRESS (or `serve --address`) leaves Ray
    alone."""
    env = {**_clean_env(), "RAY_ADDRESS": "10.0.0.1:6379"}
    code = "import stm_ray.cli; import ray; from ray._private import ray_constants as c; print('CLUSTER', c.ENABLE_RAY_CLUSTER)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "CLUSTER True" in out.stdout, out.stderr[-2000:]
    code = ("import stm_ray, os; from stm_ray.ray_setup import join_cluster_env; join_cluster_env('10.0.0.1:6379'); "
            "import ray; from ray._private import ray_constants as c; print('CLUSTER', c.ENABLE_RAY_CLUSTER, "
            "os.environ['RAY_ADDRESS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert "CLUSTER True 10.0.0.1:6379" in out.stdout, out.stderr[-2000:]
