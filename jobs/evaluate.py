"""Ray job entrypoint: evaluate the base model, the experts and the merged model (the `evaluate` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py jobs/configs/local.yaml eval.top_k=100

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages evaluate`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Writes <run_dir>/eval/<base|expert-NAME|merged>/<task>.json (mteb format); files whose fingerprint matches
are reused.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "evaluate", *sys.argv[1:]]))
