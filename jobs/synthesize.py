"""Ray job entrypoint: mine hard negatives and write new ones with vLLM actors (the `synthesize` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/synthesize.py jobs/configs/local.yaml synth.concurrency=[1,4]

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages synthesize`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Writes <run_dir>/synth/<task>/part-*.parquet and <run_dir>/synth/instructions/<task>.json; a resubmitted job
writes only the missing shards (same fingerprint) or redoes them (another one).
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "synthesize", *sys.argv[1:]]))
