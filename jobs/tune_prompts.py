"""Ray job entrypoint: Ray Tune search over query instructions (the `stm-ray tune-prompts` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune_prompts.py jobs/configs/local.yaml search.max_concurrent_trials=4

Arguments: a pipeline config YAML, then key=value overrides. Tunes <run_dir>/merged when present, else the base
model; writes <run_dir>/search/instructions.json (and the winner into the model folder when it belongs to the run).
"""

from __future__ import annotations

import sys

from stm_ray.config import load_config
from stm_ray.search import instruction_table, search_instructions
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    print(instruction_table(search_instructions(cfg, show_progress=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
