"""Deploying the retriever: what to serve, the corpus index, the Serve config file, and starting it on Ray.

``stm-ray serve RUN_DIR_OR_MODEL [--corpus TASK]`` calls :func:`start`; ``--write-config`` calls
:func:`serve_config_yaml`, a file that ``serve run`` / ``serve deploy`` accept and a KubeRay RayService embeds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from stm_ray.storage import run_path

log = logging.getLogger("stm_ray.serve")

IMPORT_PATH = "stm_ray.serve.app:build_app"


def _is_model_folder(p: Path) -> bool:
    return (p / "modules.json").is_file() or (p / "config.json").is_file()


def resolve_target(target: str) -> tuple[str, Path | None]:
    """(model, run_dir): a run directory serves its ``merged/`` model; anything else is a model (folder, alias or
    hub id) served as it is. On object storage (``s3://bucket/run``) the model stays a URI that each replica
    fetches (the run's ``merged/`` when it has one)."""
    from stm_ray.storage import MARKER, RunStore, is_remote

    if is_remote(target):
        store = RunStore(target)
        if store.read_json(f"merged/{MARKER}") is not None:
            return f"{store.uri}/merged", run_path(store.uri)
        if store.read_json(MARKER) is not None:
            return store.uri, None
        raise FileNotFoundError(f"{target}: neither a finished model folder nor a run with a merged model on the "
                                "store (run `stm-ray merge` first)")
    p = Path(target).expanduser()
    if p.is_dir() and not _is_model_folder(p):
        if _is_model_folder(p / "merged"):
            return str((p / "merged").resolve()), p.resolve()
        experts = sorted(x.name for x in (p / "experts").glob("*") if _is_model_folder(x)) if (p / "experts").is_dir() else []
        hint = (f"; its experts ({', '.join(experts)}) can be served directly, e.g. {p / 'experts' / experts[0]}"
                if experts else "")
        raise FileNotFoundError(f"{p} is neither a model folder nor a run directory with a merged model "
                                f"(run `stm-ray merge` first){hint}")
    if p.is_dir():
        return str(p.resolve()), None
    from stm_ray.modeling.aliases import resolve_model

    return resolve_model(target), None


def index_folder(cfg, corpus: str, run_dir: Path | None) -> Path:
    from stm_ray.serve.index import task_slug

    root = Path(cfg.serve.index_dir) if cfg.serve.index_dir else (run_dir or run_path(cfg.run_dir)) / "index"
    return root / task_slug(corpus)


def app_args(cfg, model: str, index_dir: str | Path | None = None, log_level: str = "INFO",
             name: str | None = None) -> dict[str, Any]:
    """The application's arguments: plain values only (they go into the Serve config file)."""
    s = cfg.serve
    return {
        # HTTP bind, app name/route and the index root belong to the Serve config, not to the replicas
        **s.model_dump(exclude={"host", "port", "ingress", "app_name", "route_prefix", "index_dir"}),
        "model": str(model), "model_name": s.model_name or name or _default_name(model), "dtype": cfg.model.dtype,
        "device": cfg.model.device, "max_length": None,
        "index_dir": str(Path(index_dir).resolve()) if index_dir else None, "log_level": log_level,
        # replicas may run in another working directory: a reranker folder travels as an absolute path
        "reranker": str(Path(s.reranker).resolve()) if s.reranker and Path(s.reranker).exists() else s.reranker,
    }


def _default_name(model: str) -> str:
    p = Path(model)
    if p.name == "merged" and p.parent.name:
        return f"{p.parent.name}-merged"
    return p.name or str(model)


def serve_config(cfg, args: dict[str, Any]) -> dict[str, Any]:
    """A Serve config (``ServeDeploySchema``): HTTP bind, the application and its deployment options."""
    from stm_ray.serve.app import deployment_options

    s = cfg.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{
            "name": s.app_name, "route_prefix": s.route_prefix, "import_path": IMPORT_PATH, "args": args,
            "deployments": [{"name": "Retriever", **deployment_options(args)}],
        }],
    }


def serve_config_yaml(cfg, args: dict[str, Any]) -> str:
    head = ("# Ray Serve config for the stm-ray retriever (written by `stm-ray serve --write-config`).\n"
            "#   serve run THIS.yaml          # local: starts Ray if needed, blocks, Ctrl-C stops\n"
            "#   serve deploy THIS.yaml       # a running cluster (dashboard address via --address)\n"
            "# The same `applications` list is a KubeRay RayService's serveConfigV2.\n"
            "# Paths in args must exist on the nodes that run replicas. A bearer token is read on the cluster\n"
            "# from the environment variable named by args.token_env; it is never written here.\n")
    return head + yaml.safe_dump(serve_config(cfg, args), sort_keys=False)


def ensure_index(cfg, model: str, corpus: str, folder: Path, show_progress: bool = True) -> dict:
    """The corpus index of ``model`` in ``folder``: reused when it is current (checked here, no model load), else
    built in a Ray task (where the replica resources are)."""
    import ray

    from stm_ray.serve.index import build_index, current_meta

    meta = current_meta(folder, model, corpus, dtype=cfg.model.dtype)
    if meta is not None:
        return {**meta, "reused": True}
    task = ray.remote(build_index).options(num_cpus=max(cfg.serve.num_cpus, 1), num_gpus=cfg.serve.num_gpus,
                                           scheduling_strategy="DEFAULT")
    return ray.get(task.remote(model, corpus, str(folder), dtype=cfg.model.dtype, device=cfg.model.device,
                               batch_size=cfg.model.batch_size, strict=cfg.data.strict, show_progress=show_progress))


def url_of(cfg) -> str:
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def example_curl(cfg, with_search: bool) -> str:
    url = url_of(cfg)
    auth = f" -H \"Authorization: Bearer ${cfg.serve.token_env}\"" if cfg.serve.token_env else ""
    lines = [f"curl -s {url}/v1/embeddings{auth} -H 'Content-Type: application/json' \\\n"
             f"     -d '{{\"input\": [\"chest pain on exertion\"], \"input_type\": \"query\"}}'"]
    if with_search:
        lines.append(f"curl -s {url}/search{auth} -H 'Content-Type: application/json' \\\n"
                     f"     -d '{{\"query\": \"chest pain on exertion\", \"top_k\": 5, \"return_text\": true}}'")
    return "\n".join(lines)


def _serve_running() -> bool:
    """Whether a Serve controller already runs on the connected Ray (then Serve's options can't be changed)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def use_direct_ingress(cfg, address: str | None) -> bool:
    """serve.ingress resolved: auto is direct for one replica on a local Ray where Serve isn't running yet."""
    mode = cfg.serve.ingress
    if mode == "proxy":
        return False
    running = _serve_running()
    if mode == "direct":
        if running:
            raise RuntimeError("serve.ingress=direct needs to start Ray Serve itself, but Serve already runs on this "
                               "Ray cluster (`serve shutdown` first, or use serve.ingress=proxy)")
        return True
    return cfg.serve.max_replicas == 1 and not address and not running


def _bind_address(host: str) -> tuple[int, str]:
    """(socket family, address) to bind for serve.host."""
    import socket

    bind = "127.0.0.1" if host == "localhost" else host
    return (socket.AF_INET6 if ":" in bind else socket.AF_INET), bind


def _check_port_free(host: str, port: int, wait_s: float = 70.0) -> None:
    """Raise a clear error when host:port can't be bound as Serve's direct-ingress server binds it (no
    SO_REUSEADDR). A port nothing listens on but that a server closed within the last minute (its connections in
    TIME_WAIT) frees itself: wait for it rather than fail a restart."""
    import socket

    family, bind = _bind_address(host)
    t0, told = time.perf_counter(), False
    while True:
        with socket.socket(family) as s:
            try:
                s.bind((bind, port))
                return
            except OSError as e:
                err = e.strerror
        with socket.socket(family) as c:
            c.settimeout(2)
            listening = c.connect_ex(("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, port)) == 0
        if listening or time.perf_counter() - t0 > wait_s:
            raise RuntimeError(f"serve.port={port} on {host} is not free ({err}{': something listens there' if listening else ''}): "
                               "stop it or pick another port (--port)")
        if not told:
            log.info("serve.port=%d: connections of a server that just stopped are closing (TIME_WAIT); waiting up "
                     "to %.0f s for the port", port, wait_s)
            told = True
        time.sleep(1.0)


def _free_port(host: str) -> int:
    import socket

    family, bind = _bind_address(host)
    with socket.socket(family) as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct-ingress flags (Ray 2.60 reads them from the controller's and the replica's environment):
    the ingress replica runs its own HTTP server on ``port``; no drain wait on shutdown and no quarantine of the
    port when a replica stops (both exist for a load balancer in front, which a local server doesn't have: a
    replica that replaces a crashed one takes the port at once)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            # Serve's port pool is range(min, max): the upper end is excluded
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def _wait_http(url: str, timeout_s: float) -> bool:
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    return False


def start(cfg, target: str, corpus: str | None = None, *, log_level: str = "INFO", show_progress: bool = True,
          address: str | None = None) -> dict[str, Any]:
    """Deploy on Ray (a local one on 127.0.0.1 unless ``address``) and return ``{url, args, index, ingress}``;
    the application keeps running after this returns (``serve.shutdown()`` stops it).

    With direct ingress (``serve.ingress``) the replica answers on host:port itself and Serve's proxy, which Ray
    still starts as a fallback, listens on a free port of the same host."""
    import ray
    from ray import serve

    from stm_ray.ray_setup import init_local_ray
    from stm_ray.serve.app import build_app

    model, run_dir = resolve_target(target)
    # Ray starts workers at nice 15; a serving replica competes with Ray's own processes for the CPU, so a Ray
    # started here runs workers at normal priority (on a cluster: set RAY_worker_niceness=0 for `ray start`).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, ignore_reinit_error=True)
    else:
        init_local_ray()
    index_meta = None
    folder = None
    if corpus:
        folder = index_folder(cfg, corpus, run_dir)
        index_meta = ensure_index(cfg, model, corpus, folder, show_progress=show_progress)
    alias = target if run_dir is None and not Path(target).expanduser().exists() else None
    args = app_args(cfg, model, folder, log_level, name=alias)
    t0 = time.perf_counter()
    host, port = cfg.serve.host, cfg.serve.port
    if use_direct_ingress(cfg, address):
        _check_port_free(host, port)
        env = direct_ingress_env(port)
        args["replica_env"] = env
        proxy_port = _free_port(host)
        serve.start(http_options={"host": host, "port": proxy_port},
                    controller_options={"runtime_env": {"env_vars": env}})
        ingress = {"mode": "direct", "port": port, "proxy_port": proxy_port}
    else:
        serve.start(http_options={"host": host, "port": port})
        ingress = {"mode": "proxy", "port": port}
    serve.run(build_app(args), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=False)
    url = url_of(cfg)
    if ingress["mode"] == "direct" and not _wait_http(f"{url}/health", 60.0):
        raise RuntimeError(f"serve.ingress=direct: the replica does not answer on {url} (its log is in Ray's session "
                           "folder, logs/serve/); serve.ingress=proxy puts Serve's proxy there instead")
    log.info("application %r up in %.1f s at %s (%s ingress)", cfg.serve.app_name, time.perf_counter() - t0, url,
             ingress["mode"])
    return {"url": url, "args": args, "index": index_meta, "ingress": ingress}
