"""Ray job entrypoint: the whole loop (synthesize -> train -> instructions -> merge -> evaluate [-> serve]).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py jobs/configs/local.yaml synth.concurrency=[1,2]

Arguments: a pipeline config YAML, then key=value overrides, then optionally --stages a,b / --skip a / --force /
--serve [--corpus TASK] (the same as `stm-ray run`). Writes everything under run_dir with <run_dir>/manifest.json
(per-stage status, timings, counts); a resubmitted job resumes and skips the stages already done. With --serve
the job ends once the application is up; the application keeps running on the cluster.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--no-block", *sys.argv[1:]]))
