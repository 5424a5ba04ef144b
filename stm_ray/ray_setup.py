"""Ray start-up: a local Ray bound to 127.0.0.1 (or the cluster in ``RAY_ADDRESS``), its workers' setup hook,
and joining a cluster from a driver."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


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
        runtime_env.setdefault("worker_process_setup_hook", "stm_ray.ray_setup.quiet_ray_workers")
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
