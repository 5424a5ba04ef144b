"""Ray job entrypoint: Ray Tune search over query instructions for the base model (the `instructions` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune_prompts.py jobs/configs/local.yaml search.max_concurrent_trials=4

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages instructions`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Writes <run_dir>/search/instructions.json; the merge stage gives the winner to the merged model. (To tune
another model, e.g. <run_dir>/merged, use `stm-ray tune-prompts --model DIR` on a node that sees the run dir.)
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "instructions", *sys.argv[1:]]))
