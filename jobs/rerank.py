"""Ray job entrypoint: train the rerankers of rerank.rerankers and rerank the retriever's top-k on the test split
(the `rerankers` and `rerank` stages of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/rerank.py jobs/configs/local.yaml 'rerank.rerankers=[cross-encoder,llm]' rerank.num_workers=2

Arguments: a pipeline config YAML, then key=value overrides (and any option of `stm-ray run`). It is
`stm-ray run CONFIG --stages rerankers,rerank`: the CLI's own entry, with its checks, errors and exit codes, the run
manifest, and s3:// / gs:// run dirs staged and mirrored.

Reads the run's shards (or train.shards) and its merged model; writes <run_dir>/rerankers/<name>/ and
<run_dir>/eval/rerank-<name>/<task>.json. A resubmitted job reuses what matches its fingerprint and resumes
interrupted training from its checkpoints.
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--stages", "rerankers,rerank", *sys.argv[1:]]))
