"""A cluster on this machine, as tests and benchmarks/bench_cluster.py use it: an S3 API server (moto's server mode)
and Ray nodes started with `ray start`, each with its own HOME (its own caches), temp ports and, for worker nodes,
a mount namespace (`unshare -m`) in which the head's local folders are an empty folder: a path that only exists on
the head fails on a worker node as it would on a real cluster. Real Ray, real S3 protocol; nothing is mocked.

Stopping kills exactly the processes this cluster started (never `ray stop`, which would end every Ray here).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def can_isolate() -> str | None:
    """None when worker nodes can get their own mount namespace here (root and unshare), else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m is not allowed here: {probe.stderr.strip()[:200]}"
    return None


class S3Server:
    """moto's S3 server on 127.0.0.1 (``moto_server``, from the test extra) with credentials for it."""

    def __init__(self, root: Path):
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = BIN / "moto_server"
        if not exe.exists():
            raise RuntimeError("moto_server not found: pip install 'moto[server]>=5.2.6' (the test extra)")
        self.log = open(root / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 60)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str) -> str:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=30).read()
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, through pyarrow's S3 filesystem (what stm-ray uses)."""
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", scheme="http")
        base = f"{bucket}/{prefix}".rstrip("/")
        if s3.get_file_info(base).type == fs.FileType.NotFound:
            return []
        return sorted(i.path[len(bucket) + 1:] for i in s3.get_file_info(fs.FileSelector(base, recursive=True))
                      if i.type == fs.FileType.File)

    def read(self, bucket: str, key: str) -> bytes:
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", scheme="http")
        with s3.open_input_stream(f"{bucket}/{key}") as f:
            return f.read()

    def stop(self) -> None:
        _kill_group(self.proc)
        self.log.close()


def _kill_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Node:
    name: str
    home: Path
    proc: subprocess.Popen | None = None
    node_id: str | None = None


@dataclass
class LocalCluster:
    """A Ray head (``ray start --head``, no CPUs of its own unless asked: it schedules nothing, as in clusters/)
    and worker nodes joined with ``ray start --address --block``; every node's HOME under ``root``."""

    root: Path
    env: dict[str, str]
    head_cpus: int = 0
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    temp_dir: str = ""
    isolate: bool = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def head_home(self) -> Path:
        return self.root / "head"

    def node_env(self, home: Path) -> dict[str, str]:
        return {**self.env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                "TORCH_EXTENSIONS_DIR": str(home / ".cache" / "torch_extensions")}

    def start(self) -> LocalCluster:
        self.head_home.mkdir(parents=True, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="stmc-")  # short: Ray's socket paths must fit in 107 bytes
        self.gcs_port, client, agent_http, agent_grpc, metrics, env_agent = free_ports(6)
        proc = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             f"--ray-client-server-port={client}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
             "--include-dashboard=false", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={env_agent}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=self.node_env(self.head_home), cwd=REPO, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{proc.stdout}\n{proc.stderr}")
        self.nodes.append(Node("head", self.head_home))
        return self

    def add_node(self, name: str, cpus: int = 1, resources: str | None = None) -> Node:
        """A worker node in its own mount namespace: the head's folder (``root/head``) reads as empty there."""
        home = self.root / name
        (home / ".cache").mkdir(parents=True, exist_ok=True)
        agent_http, agent_grpc, metrics, env_agent = free_ports(4)
        start = [str(BIN / "ray"), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                 f"--num-cpus={cpus}", "--num-gpus=0", f"--dashboard-agent-listen-port={agent_http}",
                 f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                 f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats", "--block"]
        if resources:
            start.append(f"--resources={resources}")
        if self.isolate:
            empty = self.root / f".empty-{name}"
            empty.mkdir(exist_ok=True)
            cmd = ["unshare", "-m", "sh", "-c",
                   f'mount --make-rprivate / && mount --bind "{empty}" "{self.head_home}" && exec "$@"', "sh", *start]
        else:
            cmd = start
        for attempt in (1, 2):  # on a loaded machine a raylet can miss the GCS's deadline once; start it again
            log = open(home / "ray-start.log", "wb")  # noqa: SIM115 - the node's own log, kept for failures
            node = Node(name, home, subprocess.Popen(cmd, env=self.node_env(home), cwd=REPO, stdout=log,
                                                     stderr=subprocess.STDOUT, start_new_session=True))
            self.nodes.append(node)
            try:
                self._wait_nodes(len([n for n in self.nodes if n.proc is None or n.proc.poll() is None]))
                return node
            except RuntimeError:
                self.nodes.remove(node)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _alive(self) -> list[dict]:
        import json

        probe = (f"import ray, json; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                 "print(json.dumps([{'id': n['NodeID'], 'cpu': n['Resources'].get('CPU', 0)} for n in ray.nodes() "
                 "if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", probe], env=self.node_env(self.head_home), capture_output=True,
                             text=True, timeout=120)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self._alive()) >= n:
                return
            dead = [x for x in self.nodes if x.proc is not None and x.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"node {dead[0].name} exited: {(dead[0].home / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout:.0f} s")

    def kill_node(self, node: Node) -> None:
        """A node that disappears (a spot instance taken back): its raylet and workers are killed."""
        import psutil

        if node.proc is None:
            raise ValueError("the head is not killed here")
        pids = []
        try:
            pids = [c.pid for c in psutil.Process(node.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        _kill_group(node.proc, timeout=5)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.remove(node)

    def session_pids(self) -> list[int]:
        import psutil

        pids = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part or f":{self.gcs_port}" in part for part in (p.info["cmdline"] or [])):
                    pids.add(p.pid)
                    pids.update(c.pid for c in p.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return sorted(pids)

    def stop(self) -> list[int]:
        for node in [n for n in self.nodes if n.proc is not None]:
            _kill_group(node.proc, timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.session_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        left = self.session_pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def cluster_env(s3: S3Server | None = None) -> dict[str, str]:
    """The environment every node and the driver share: offline models, token auth as on a shared cluster, the
    S3 server's endpoint and credentials."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_worker_niceness": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONPATH": str(REPO)}
    for k in ("RAY_ADDRESS", "STM_RAY_CACHE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "STM_RAY_SET_LOOPBACK"):
        env.pop(k, None)
    if s3 is not None:
        env.update(s3.env)
    return env


def fake_autoscaler_config(gcs_address: str, *, max_workers: int = 2, idle_minutes: float = 0.1) -> dict:
    """A cluster config for Ray's fake multi-node provider: a head with no CPUs and a ``{CPU: 1}`` worker type
    (0 to ``max_workers`` nodes) that the autoscaler starts as real raylets on this machine and removes once idle
    for ``idle_minutes``."""
    return {
        "cluster_name": "stm-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        # no updaters (there is nothing to set up by SSH: the provider starts raylets itself), as in Ray's own
        # fake-cluster examples
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class AutoscaledCluster(LocalCluster):
    """A head started with Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config``): worker nodes come and go as Ray's autoscaler decides. They are raylets started by the
    autoscaler's process, so they share the head's HOME (the provider has no per-node environment)."""

    max_workers: int = 2
    idle_minutes: float = 0.5

    def start(self) -> AutoscaledCluster:
        import yaml

        self.head_home.mkdir(parents=True, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="stma-")
        self.gcs_port, client, agent_http, agent_grpc, metrics, env_agent = free_ports(6)
        cfg = self.root / "autoscaler.yaml"
        cfg.write_text(yaml.safe_dump(fake_autoscaler_config(self.address, max_workers=self.max_workers,
                                                             idle_minutes=self.idle_minutes)))
        env = {**self.node_env(self.head_home), "RAY_FAKE_CLUSTER": "1"}
        proc = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             f"--ray-client-server-port={client}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats", f"--autoscaling-config={cfg}"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --head (autoscaling) failed:\n{proc.stdout}\n{proc.stderr}")
        self.nodes.append(Node("head", self.head_home))
        return self

    def alive_workers(self) -> int:
        return sum(1 for n in self._alive() if n["cpu"] > 0)
