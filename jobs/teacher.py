"""Ray job entrypoint: teacher scores for every shard row (the `teacher` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/teacher.py jobs/configs/local.yaml teacher.kind=llm train.distill.loss=stabilized

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages teacher`: the CLI's own entry, with its checks, errors and exit codes, the run manifest,
and s3:// / gs:// run dirs staged and mirrored.

Writes <run_dir>/teacher/ (the shards with positive_score / negative_scores, manifest.json); a resubmitted job
scores only the shards not yet written (same fingerprint).
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "teacher", *sys.argv[1:]]))
