"""Keep a local Ray Serve replica's inter-deployment gRPC server on loopback.

Ray Serve 2.60 starts a gRPC server in every replica (``ray/serve/_private/replica.py``, ``_on_initialized``) bound
to ``[::]:0``, every interface, whatever the node's address: on a local Ray that otherwise listens only on
127.0.0.1 (cluster mode off, see ``stm_ray/__init__.py``) it is the one port open to the network. When cluster mode
is off, the only peers are on this machine, so the replica's server is bound to 127.0.0.1 instead. On a cluster
(cluster mode on) nothing changes. Importing :mod:`stm_ray.serve.app` (which every replica does) installs it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("stm_ray.serve")

_ALL = "[::]:"


def install() -> bool:
    """Patch the replica module's gRPC port helper when Ray's cluster mode is off; True when installed."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        return False
    try:
        from ray.serve._private import replica
    except ImportError:  # another Ray layout: leave it alone
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_stm_ray_loopback", False):
        return original is not None

    def add_port_on_loopback(server, address: str):
        if isinstance(address, str) and address.startswith(_ALL):
            address = "127.0.0.1:" + address[len(_ALL):]
        return original(server, address)

    add_port_on_loopback._stm_ray_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_loopback
    return True
