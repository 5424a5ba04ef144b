"""Ray job entrypoint: deploy the run's merged retriever on Ray Serve (the `serve` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve.py jobs/configs/local.yaml --corpus icd10 serve.max_replicas=4

Arguments: a pipeline config YAML, optionally `--corpus TASK` (indexes it for /search), then key=value overrides.
It is `stm-ray run CONFIG --stages serve --no-block`: the CLI's own entry, with its checks and errors. Serves
<run_dir>/merged (falls back to model.name_or_path when the run has no merged model yet). The job ends once the
application is up; the application keeps running on the cluster (`serve shutdown` or `serve delete stm-ray` stops
it). For a long-lived service prefer a Serve config (`stm-ray serve RUN --write-config serve.yaml`, then
`serve deploy serve.yaml`) or a KubeRay RayService.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--no-block", "--stages", "serve", *sys.argv[1:]]))
