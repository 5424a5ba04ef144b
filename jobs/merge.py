"""Ray job entrypoint: Ray Tune + mergekit search over merges of the experts (the `stm-ray merge` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/merge.py jobs/configs/local.yaml search.max_concurrent_trials=4

Arguments: a pipeline config YAML, then key=value overrides. Reads <run_dir>/experts/*; writes <run_dir>/merged/
(with merge.json) and <run_dir>/search/merge_trials.png.
"""

from __future__ import annotations

import sys

from stm_ray.config import load_config
from stm_ray.search import merge_table, search_merge
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    print(merge_table(search_merge(cfg, show_progress=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
