"""Ray job entrypoint: evaluate a model on the configured tasks (the `stm-ray evaluate` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py jobs/configs/local.yaml model.name_or_path=minilm

Arguments: a pipeline config YAML, then key=value overrides. Results go to <run_dir>/eval/<task>.json (mteb format).
"""

from __future__ import annotations

import sys
from pathlib import Path

from stm_ray.config import load_config
from stm_ray.eval import evaluate_tasks, results_table
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    results = evaluate_tasks(cfg, output=Path(cfg.run_dir) / "eval")
    print(results_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
