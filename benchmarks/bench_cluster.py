"""The loop on a multi-node cluster with object storage, and nodes that die (issue 34, 5a-5e), on this machine.

A Ray head (no CPUs: it schedules nothing) and two 1-CPU worker nodes started with `ray start`, each with its own
HOME and its own mount namespace in which the head's folders read as empty; an S3 API server (moto's server mode)
on 127.0.0.1 as the run directory (tests/cluster.py). Scenarios (tests/cluster_scenarios.py, the same code the
tests assert on):

  loop            synthesize, train (2 experts side by side), merge, evaluate with run_dir=s3://...; a second
                  driver with an empty cache; a redo of synthesis
  train-kill      the node training an expert killed after a checkpoint reached the store (a replacement node joins)
  synth-kill      the node running the vLLM engine actor killed during synthesis (a replacement node joins)
  driver-restart  the driver killed during training (a lost head / a stopped job) and run again
  autoscaler      a head with no CPUs under Ray's fake multi-node autoscaler: the synthesis engine pool
                  (concurrency [1, 2]) makes it add 1-CPU nodes, removed once idle

    python benchmarks/bench_cluster.py                 # all scenarios, about 10 minutes here
    python benchmarks/bench_cluster.py --only loop,train-kill
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import claim, finish  # noqa: E402
from tests.cluster import AutoscaledCluster, LocalCluster, S3Server, can_isolate, cluster_env  # noqa: E402
from tests.cluster_scenarios import (  # noqa: E402
    make_tasks,
    scenario_autoscaler,
    scenario_driver_restart,
    scenario_loop,
    scenario_synth_node_kill,
    scenario_train_node_kill,
)

SCENARIOS = ("loop", "train-kill", "synth-kill", "driver-restart", "autoscaler")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of: {', '.join(SCENARIOS)}")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    why = can_isolate()
    if why:
        print(f"bench_cluster: worker nodes need their own mount namespace: {why}", file=sys.stderr)
        return 2
    from tests.conftest import build_tiny_bert, build_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="stm-bench-cluster-"))
    figures: dict = {"nodes": "head (0 CPU) + 2 worker nodes (1 CPU each), own HOME and mount namespace each",
                     "store": "moto server (S3 API) on 127.0.0.1"}
    s3 = S3Server(root)
    cluster = LocalCluster(root / "cluster", cluster_env(s3))
    try:
        (root / "cluster" / "models").mkdir(parents=True)
        bert = build_tiny_bert(root / "cluster" / "models" / "tiny-bert")
        llama = build_tiny_llama(root / "cluster" / "models" / "tiny-llama")
        tasks = make_tasks(root / "cluster" / "data")
        t0 = time.perf_counter()
        cluster.start()
        cluster.add_node("node1", cpus=1)
        cluster.add_node("node2", cpus=1)
        figures["cluster_start_s"] = round(time.perf_counter() - t0, 1)
        def autoscaled() -> dict:
            c = AutoscaledCluster(root / "autoscaled", cluster_env(s3)).start()
            try:
                return scenario_autoscaler(c, s3, tasks, bert, llama)
            finally:
                figures["autoscaled_processes_left"] = c.stop()

        runs = {"loop": lambda: scenario_loop(cluster, s3, tasks, bert), "autoscaler": autoscaled,
                "train-kill": lambda: scenario_train_node_kill(cluster, s3, tasks, bert),
                "synth-kill": lambda: scenario_synth_node_kill(cluster, s3, tasks, bert, llama),
                "driver-restart": lambda: scenario_driver_restart(cluster, s3, tasks, bert)}
        for name in only:
            print(f"--- {name}", flush=True)
            r = runs[name]()
            ok = r.get("returncode") == 0
            # logs only where something failed; the listing and manifest are the store's, not figures
            figures[name] = {k: v for k, v in r.items() if k not in ("keys", "manifest") and not (ok and "tail" in k)}
            print({k: v for k, v in figures[name].items() if not k.endswith("tail")}, flush=True)
    finally:
        figures["processes_left"] = cluster.stop() if cluster.temp_dir else []
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    return finish(__file__, figures, claims(figures))


def claims(f: dict) -> list[dict]:
    loop, tk, sk, dr, au = (f.get(k) or {} for k in ("loop", "train-kill", "synth-kill", "driver-restart",
                                                     "autoscaler"))
    loop_ok = (loop.get("returncode") == 0 and loop.get("rerun_actions") == dict.fromkeys(
        ("synthesize", "train", "merge", "evaluate"), "reused") and loop.get("redo_listed") is not None
               and loop.get("redo_listed") == loop.get("redo_on_store"))
    recovered = {"train-kill": tk.get("returncode") == 0 and bool(tk.get("killed"))
                 and tk.get("steps") == tk.get("total_steps"),
                 "synth-kill": sk.get("returncode") == 0 and bool(sk.get("killed")) and sk.get("rows_lost") == 0,
                 "driver-restart": dr.get("returncode") == 0 and dr.get("actions") == {"synthesize": "reused",
                                                                                      "train": "resumed"}}
    kinds = sum(recovered.values())
    lost_dup = (sk["rows_lost"] + sk["rows_duplicated"]) if "rows_lost" in sk else None
    # the worker had reached at most (checkpoint at the kill + interval - 1) steps; it resumed from resumed_from
    redone = (tk["checkpoint_step_at_kill"] + tk["checkpoint_every"] - 1 - tk["resumed_from"][0]
              if tk.get("resumed_from") else None)
    return [
        claim("loop on 3 nodes with an S3 run dir completes, reruns from an empty cache, redoes without stale objects",
              int(loop_ok), "1", loop_ok),
        claim("node kills recovered (kinds: train node, synthesis node, driver)", kinds, ">= 3", kinds >= 3),
        claim("rows lost + rows written twice after the synthesis node kill", lost_dup, "0", lost_dup == 0),
        claim("steps redone after the training node kill (upper bound)", redone,
              f"<= checkpoint interval ({tk.get('checkpoint_every')})",
              redone is not None and 0 <= redone <= tk["checkpoint_every"]),
        claim("nodes the autoscaler added", au.get("nodes_added"), ">= 1", (au.get("nodes_added") or 0) >= 1),
        claim("nodes the autoscaler removed once idle", au.get("nodes_removed"), ">= 1",
              (au.get("nodes_removed") or 0) >= 1),
        claim("seconds from the synthesis job's start to the first added node up", au.get("first_node_up_s"),
              "measured", au.get("first_node_up_s") is not None),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
