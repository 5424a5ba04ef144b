"""How Ray Data's autoscaling actor pools actually scaled, read from the running executor's operator metrics.

``map_batches(..., concurrency=(min, max))`` (and ``ray.data.llm``'s engine stage) runs an autoscaling actor pool:
Ray Data adds actors while the pool is busy and resources allow, up to ``max``, and releases idle ones down to
``min``. The final ``Dataset.stats()`` only holds the end state, so :class:`ActorPoolSampler` polls the executor's
per-operator metrics (``num_alive_actors``, ``num_pending_actors``, the figures Ray Data's stats and dashboard
report) while the dataset streams, and keeps a timeline per actor-pool operator.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class ActorPoolSampler:
    """``with ActorPoolSampler(ds): for batch in ds.iter_batches(): ...`` then ``.summary()``."""

    def __init__(self, ds, interval_s: float = 0.5, max_points: int = 240):
        self.ds, self.interval_s, self.max_points = ds, interval_s, max_points
        self.timelines: dict[str, list[tuple[float, int, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stm-actor-pool-sampler", daemon=True)
        self._t0 = 0.0
        self._warned = False

    def __enter__(self) -> ActorPoolSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        try:
            executor = getattr(self.ds, "_current_executor", None)
            topology = getattr(executor, "_topology", None) or {}
            t = round(time.perf_counter() - self._t0, 2)
            for op in list(topology):
                if not hasattr(op, "_actor_pool"):
                    continue
                m = op.metrics.as_dict()
                point = (t, int(m.get("num_alive_actors") or 0), int(m.get("num_pending_actors") or 0))
                line = self.timelines.setdefault(op.name, [])
                if not line or line[-1][1:] != point[1:]:
                    line.append(point)
        except Exception as e:  # internals of Ray Data moved: report nothing rather than fail the run
            if not self._warned:
                log.warning("actor-pool sampling unavailable with this Ray version: %s", e)
                self._warned = True

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per actor-pool operator: peak and last alive actors and the (seconds, alive, pending) change points."""
        out = {}
        for name, line in self.timelines.items():
            step = max(1, len(line) // self.max_points)
            alive = [p[1] for p in line]
            out[name] = {"peak_alive": max(alive), "last_alive": alive[-1], "timeline": [list(p) for p in line[::step]]}
        return out
