"""Training's rendezvous listens on the node's address only (127.0.0.1 for a local run), never on every interface:
two real processes join a gloo process group through stm_ray.train.rendezvous, and their listening sockets are
read back from the kernel (psutil) while the group is up. The default torch path is measured beside it, so the
test shows what it guards against."""

from __future__ import annotations

import multiprocessing as mp
import socket

import psutil
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, bound: bool, ready, done) -> None:
    import torch
    import torch.distributed as dist

    from stm_ray.train.rendezvous import init_bound_process_group

    if bound:
        init_bound_process_group(rank, 2, "127.0.0.1", port, "gloo", 60)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2
    ready.set()
    done.wait(60)
    dist.destroy_process_group()


def _listeners(bound: bool) -> set[str]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    ready = [ctx.Event(), ctx.Event()]
    done = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(r, port, bound, ready[r], done)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for e in ready:
            assert e.wait(120), "the process group did not form"
        pids = {p.pid for p in procs}
        return {c.laddr.ip for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in pids}
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


@pytest.mark.timeout(300)
def test_rendezvous_store_binds_the_given_address_only():
    bound = _listeners(True)
    assert bound and bound <= {"127.0.0.1"}, bound
    default = _listeners(False)  # what torch does by itself: the store on every interface
    assert default & {"0.0.0.0", "::"}, default


def test_interface_of_loopback():
    from stm_ray.train.rendezvous import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None
