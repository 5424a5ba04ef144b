"""Ray job entrypoint: train one LoRA expert per data source, in parallel (the `stm-ray train` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py jobs/configs/local.yaml train.num_workers=2

Arguments: a pipeline config YAML, then key=value overrides. Reads shards from train.shards (default
<run_dir>/synth); writes <run_dir>/experts/<name>/ and <run_dir>/experts/summary.json.
"""

from __future__ import annotations

import sys

from stm_ray.config import load_config
from stm_ray.train import summary_table, train_experts
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    results = train_experts(cfg, show_progress=False)
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
