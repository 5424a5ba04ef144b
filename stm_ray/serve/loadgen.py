"""A small closed-loop HTTP load generator (aiohttp): N requests at a fixed concurrency, every outcome counted.

Used by the load test and ``benchmarks/bench_serve.py``; it works against any HTTP server, so the baselines are
measured with the same client. A request that gets no HTTP status (connection reset, timeout) is *lost*.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    lost: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("latencies_ms")
        d["errors"] = self.errors[:5]
        d.update(rps=round(self.rps, 1), p50_ms=round(self.pct(50), 2), p99_ms=round(self.pct(99), 2),
                 server_errors=self.server_errors)
        return d


async def _run(requests: list[tuple[str, str, bytes | None]], concurrency: int, headers: dict[str, str],
               timeout_s: float) -> LoadResult:
    import aiohttp

    n = len(requests)
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    errors: list[str] = []
    lost = 0
    nxt = 0
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    hdrs = {"Content-Type": "application/json", **headers}

    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=hdrs) as session:
        async def worker() -> None:
            nonlocal nxt, lost
            while nxt < n:
                method, url, body = requests[nxt]
                nxt += 1
                t0 = time.perf_counter()
                try:
                    async with session.request(method, url, data=body) as r:
                        await r.read()
                        statuses[r.status] += 1
                        lat.append((time.perf_counter() - t0) * 1000)
                except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                    lost += 1
                    if len(errors) < 20:
                        errors.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        seconds = time.perf_counter() - t0
    return LoadResult(n, concurrency, seconds, dict(statuses), lost, lat, errors)


def run_load(requests: list[tuple[str, str, bytes | None]], concurrency: int, *, headers: dict[str, str] | None = None,
             timeout_s: float = 60.0) -> LoadResult:
    """Send ``(method, url, body)`` requests with ``concurrency`` in flight; count statuses, lost requests and
    latencies."""
    return asyncio.run(_run(requests, concurrency, headers or {}, timeout_s))
