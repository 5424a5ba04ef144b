"""Ray job entrypoint: write and filter synthetic queries for the docs: tasks (the `queries` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/queries.py jobs/configs/local.yaml 'data.tasks=[docs:/mnt/shared/notes]' synth.concurrency=[1,4]

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages queries`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Writes <run_dir>/queries/<docs-name>/ (a BEIR folder of the kept queries, raw/ generations, manifest.json); a
resubmitted job generates only the missing raw shards (same fingerprint) and refilters when only a filter changed.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "queries", *sys.argv[1:]]))
