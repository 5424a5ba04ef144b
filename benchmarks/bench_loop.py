"""The user's clock: `stm-ray demo` (the whole loop on the embedded default) from a fresh clone, measured N times.

Each run clones this repository's committed HEAD into an empty temporary folder and runs the clone's code
(`python -m stm_ray.cli demo`) with this project's installed environment, a fresh HOME (so the SmolLM2 GGUF is
converted again, as on a new machine), HF_HUB_OFFLINE=1 and a new run directory: what `make demo` does after its
install step. Recorded per run: the process's wall time, the loop's seconds (the pipeline's stages, as
manifest.json records them), the seconds per stage and the test NDCG@10 table; then, in one more fresh clone, the
fast test tier (`pytest -m "not slow"`, what `make test` runs) with its wall time. Claims (issue 35): the slowest
run's loop <= 420 s, the fast tier <= 720 s.

    python benchmarks/bench_loop.py [--runs 2] [--goal-s 420] [--tests-goal-s 720] [--no-tests]

Writes benchmarks/results/bench_loop.json. Uncommitted changes are not measured (commit first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import claim, finish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_run(i: int, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="stm_bench_loop_"))
    try:
        clone = tmp / "stm-ray"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        (tmp / "home").mkdir()
        env = {**os.environ, "HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(clone)}
        for var in ("VIRTUAL_ENV", "STM_RAY_CACHE", "RAY_ADDRESS"):
            env.pop(var, None)
        run_dir = tmp / "run"
        log = tmp / "demo.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, "-m", "stm_ray.cli", "demo", "--run-dir", str(run_dir),
                                 "--no-progress"], cwd=clone, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"run {i}: stm-ray demo exited {rc}; see {log}")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        stages = {n: s.get("seconds") for n, s in manifest["stages"].items() if s.get("status") == "done"}
        console = log.read_text(encoding="utf-8", errors="replace").splitlines()
        ndcg = manifest["stages"]["evaluate"]["counts"]["ndcg_at_10"]
        out = {"run": i, "commit": commit, "wall_s": round(wall, 1), "stage_s": stages,
               "stages_total_s": round(sum(v for v in stages.values() if v), 1), "console_lines": len(console),
               "ndcg_at_10_mean": {label: round(v["mean"], 4) for label, v in ndcg.items()}}
        print(f"run {i} ({commit}): {wall:.0f} s wall, loop {out['stages_total_s']:.0f} s, {len(console)} console "
              "lines; " + ", ".join(f"{n} {s:.0f}" for n, s in stages.items()), flush=True)
        return out
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def fast_tier() -> dict:
    """`pytest -m "not slow"` in a fresh clone (this environment, a fresh HOME): wall time and the summary line."""
    tmp = Path(tempfile.mkdtemp(prefix="stm_bench_tests_"))
    try:
        clone = tmp / "stm-ray"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        (tmp / "home").mkdir()
        env = {**os.environ, "HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(clone)}
        for var in ("VIRTUAL_ENV", "STM_RAY_CACHE", "RAY_ADDRESS"):
            env.pop(var, None)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider",
                            "--durations=15"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = p.stdout.strip().splitlines()
        summary = lines[-1] if lines else ""
        slowest = [ln for ln in lines if ln[:1].isdigit() and (" call " in ln or " setup " in ln)][:15]
        print(f"fast tier: {wall:.0f} s, rc {p.returncode}: {summary}", flush=True)
        return {"wall_s": round(wall, 1), "rc": p.returncode, "summary": summary, "slowest": slowest}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="fresh-clone demo runs (default 2)")
    ap.add_argument("--goal-s", type=float, default=420.0, help="goal for the slowest run's loop seconds (default 420)")
    ap.add_argument("--tests-goal-s", type=float, default=720.0, help="goal for the fast tier's wall time (default 720)")
    ap.add_argument("--no-tests", action="store_true", help="do not run the fast test tier")
    ap.add_argument("--keep", action="store_true", help="keep each run's temporary folder (clone, run dir, log)")
    args = ap.parse_args()
    if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "stm_ray"]).returncode != 0:
        print("warning: stm_ray/ has uncommitted changes; the runs measure the committed HEAD", flush=True)
    runs = [one_run(i, args.keep) for i in range(1, args.runs + 1)]
    stages = list(dict.fromkeys(n for r in runs for n in r["stage_s"]))
    print("\n| run | commit | wall s | " + " | ".join(stages) + " |")
    print("|---|---|---|" + "---|" * len(stages))
    for r in runs:
        print(f"| {r['run']} | {r['commit']} | {r['wall_s']:.0f} | "
              + " | ".join(f"{r['stage_s'].get(n) or 0:.0f}" for n in stages) + " |")
    slowest = max(r["stages_total_s"] for r in runs)
    claims = [claim(f"stm-ray demo's loop from a fresh clone, slowest of {len(runs)} runs, s", slowest,
                    f"<= {args.goal_s:.0f}", slowest <= args.goal_s)]
    tests = None
    if not args.no_tests:
        tests = fast_tier()
        claims.append(claim("fast test tier (make test) from a fresh clone, wall s", tests["wall_s"],
                            f"<= {args.tests_goal_s:.0f}", tests["wall_s"] <= args.tests_goal_s and tests["rc"] == 0))
    return finish(__file__, {"runs": runs, "goal_s": args.goal_s, "fast_tier": tests,
                             "tests_goal_s": args.tests_goal_s}, claims)


if __name__ == "__main__":
    raise SystemExit(main())
