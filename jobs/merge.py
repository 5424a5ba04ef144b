"""Ray job entrypoint: Ray Tune + mergekit search over merges of the experts (the `merge` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/merge.py jobs/configs/local.yaml search.max_concurrent_trials=4

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages merge`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Reads <run_dir>/experts/*; writes <run_dir>/merged/ (with merge.json) and <run_dir>/search/merge_trials.png.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "merge", *sys.argv[1:]]))
