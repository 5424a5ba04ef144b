"""Small shared helpers: atomic writes, logging, device choice."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("stm_ray")


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Tune's TensorBoard logger renames metrics like ndcg/icd10:1,2 on every trial, at INFO
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    _put(path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Bytes version of :func:`atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _put(path)
    return path


def _put(path: Path) -> None:
    """A finished atomic write inside a remote run's working copy goes to the object store at once."""
    from stm_ray.storage import on_local_write

    on_local_write(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (old contents removed),
    on error it is deleted: readers see the old folder or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _put(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_local_ray(num_cpus: int | None = None, **kwargs: Any):
    """Start (or join) a single-machine Ray bound to 127.0.0.1 only.

    On Linux, Ray resolves even ``127.0.0.1`` to the machine's primary address, so a laptop run would listen on
    the network. Ray keeps everything on loopback when its cluster mode is off, which ``import stm_ray`` sets before
    ``ray`` can be imported (see ``stm_ray/__init__.py``); this warns when the caller imported ray first.
    """
    import ray

    if ray.is_initialized():
        return ray
    if not os.environ.get("RAY_ADDRESS"):
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("ray was imported before stm_ray, so this local Ray listens on the machine's network address: "
                        "import stm_ray first, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before starting Python")
    kwargs.setdefault("include_dashboard", False)
    if not kwargs["include_dashboard"]:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env.setdefault("worker_process_setup_hook", "stm_ray.utils.quiet_ray_workers")
        kwargs["runtime_env"] = runtime_env
    from stm_ray.console import quiet_ray, quiet_ray_logging

    quiet_ray_logging()
    ray.init(num_cpus=num_cpus, **kwargs)

    quiet_ray()  # a CLI command without --verbose: Ray's output to the run's log file
    return ray


# Ray Train's PlacementGroupCleaner asks the State API (served by the dashboard) every few seconds whether the
# train controller is alive; a local Ray here runs without a dashboard, so each ask fails with a warning, forwarded
# to the user's console for the whole of training. When another Ray runs on the machine, the ask cannot even pick
# its cluster and the cleaner's thread dies with a traceback. Nothing is lost by muting it: on a single machine the
# placement groups go with the local Ray when the driver exits.
_NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_workers() -> None:
    """``worker_process_setup_hook`` of a local Ray without a dashboard (see :data:`_NOISY_RAY_LOGGERS`): the
    workers' State API calls address their own cluster, and their failure warnings are muted."""
    for name in _NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a hook must never stop a worker
        pass


def join_cluster_env(address: str) -> None:
    """Before ``ray`` is imported: let this process join the cluster at ``address`` (undo the loopback setting
    ``import stm_ray`` made for a local Ray; a driver joining a cluster needs its own address)."""
    import sys

    from stm_ray import LOOPBACK_ENV

    if "ray" not in sys.modules and os.environ.pop("STM_RAY_SET_LOOPBACK", None):
        os.environ.pop(LOOPBACK_ENV, None)
    os.environ["RAY_ADDRESS"] = address
