"""Ray job entrypoint: train one LoRA expert per data source, in parallel (the `train` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py jobs/configs/local.yaml train.num_workers=2

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages train`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Reads the run's shards (or train.shards); writes <run_dir>/experts/<name>/ and <run_dir>/experts/summary.json.
A resubmitted job reuses experts whose fingerprint matches and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "train", *sys.argv[1:]]))
