"""Ray job entrypoint: mine hard negatives and write new ones with vLLM actors (the `stm-ray synthesize` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/synthesize.py jobs/configs/local.yaml synth.concurrency=[1,4]

Arguments: a pipeline config YAML, then key=value overrides. Writes <run_dir>/synth/<task>/part-*.parquet and
<run_dir>/synth/instructions/<task>.json; a resubmitted job writes only the missing shards.
"""

from __future__ import annotations

import sys

from stm_ray.config import load_config
from stm_ray.synth import synthesize
from stm_ray.synth.pipeline import summary_table
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    print(summary_table(synthesize(cfg, show_progress=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
