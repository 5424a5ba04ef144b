"""Ray Train's torch.distributed set-up, bound to the node's address instead of every interface.

Ray Train hands rank 0's node address to ``init_process_group``; torch's rendezvous store (TCPStore, libuv or not)
then listens on ``0.0.0.0`` / ``::`` whatever address it is given, and gloo's pair sockets on whatever the host
name resolves to. Here rank 0 binds the store's socket itself, on that address (127.0.0.1 for a local Ray, the
node's cluster address on a cluster), and hands it to torch (``TCPStore(master_listen_fd=...)``, torch's supported
way); gloo gets the interface holding that address (``GLOO_SOCKET_IFNAME``). Every trainer (experts, rerankers)
uses :func:`torch_config`.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend


def interface_of(addr: str) -> str | None:
    """The network interface that holds ``addr`` (``lo`` for 127.0.0.1), None when none does."""
    if addr.startswith("127.") or addr == "::1":
        return "lo"
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address.split("%")[0] == addr for a in addrs):
                return name
    except Exception:  # noqa: BLE001 - without it gloo falls back to its own choice
        return None
    return None


def init_bound_process_group(world_rank: int, world_size: int, addr: str, port: int, backend: str,
                             timeout_s: int) -> None:
    """``init_process_group`` on a store that rank 0 serves on ``addr`` only (runs in each training worker)."""
    import torch.distributed as dist

    ifname = interface_of(addr)
    if ifname and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1024)
        store = dist.TCPStore(addr, port, world_size, True, timeout, master_listen_fd=s.detach(),
                              wait_for_workers=False)
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, init_bound_process_group, world_rank=i,
                                                   world_size=len(worker_group), addr=addr, port=port,
                                                   backend=backend, timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class BoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose rendezvous listens on the node's address only."""

    @property
    def backend_cls(self):
        return _BoundBackend


def torch_config() -> TorchConfig:
    return BoundTorchConfig()
