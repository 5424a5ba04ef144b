"""Deploying the retriever: what to serve, the corpus index, the Serve config file, and starting it on Ray.

``stm-ray serve RUN_DIR_OR_MODEL [--corpus TASK]`` calls :func:`serve_model`; ``--write-config`` calls
:func:`serve_config_yaml`, a file that ``serve run`` / ``serve deploy`` accept and a KubeRay RayService embeds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("stm_ray.serve")

IMPORT_PATH = "stm_ray.serve.app:build_app"


def _is_model_folder(p: Path) -> bool:
    return (p / "modules.json").is_file() or (p / "config.json").is_file()


def resolve_target(target: str) -> tuple[str, Path | None]:
    """(model, run_dir): a run directory serves its ``merged/`` model; anything else is a model (folder, alias or
    hub id) served as it is."""
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

    root = Path(cfg.serve.index_dir) if cfg.serve.index_dir else (run_dir or Path(cfg.run_dir)) / "index"
    return root / task_slug(corpus)


def app_args(cfg, model: str, index_dir: str | Path | None = None, log_level: str = "INFO",
             name: str | None = None) -> dict[str, Any]:
    """The application's arguments: plain values only (they go into the Serve config file)."""
    s = cfg.serve
    return {
        # HTTP bind, app name/route and the index root belong to the Serve config, not to the replicas
        **s.model_dump(exclude={"host", "port", "app_name", "route_prefix", "index_dir"}),
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


def start(cfg, target: str, corpus: str | None = None, *, log_level: str = "INFO", show_progress: bool = True,
          address: str | None = None) -> dict[str, Any]:
    """Deploy on Ray (a local one on 127.0.0.1 unless ``address``) and return ``{url, args, index}``; the
    application keeps running after this returns (``serve.shutdown()`` stops it)."""
    import ray
    from ray import serve

    from stm_ray.serve.app import build_app
    from stm_ray.utils import init_local_ray

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
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(args), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=False)
    log.info("application %r up in %.1f s", cfg.serve.app_name, time.perf_counter() - t0)
    return {"url": url_of(cfg), "args": args, "index": index_meta}
