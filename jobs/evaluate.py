"""Ray job entrypoint: evaluate a model on the configured tasks (the `stm-ray evaluate` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py jobs/configs/local.yaml model.name_or_path=minilm

Arguments: a pipeline config YAML, then key=value overrides. Results go to <run_dir>/eval/<task>.json (mteb format).
"""

from __future__ import annotations

import sys
from pathlib import Path

from stm_ray.config import load_config
from stm_ray.eval import evaluate, format_table
from stm_ray.modeling import Embedder
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    cfg = load_config(argv[0] if argv else None, argv[1:])
    emb = Embedder.from_config(cfg.model)
    rows = []
    for task in cfg.data.tasks:
        out = Path(cfg.run_dir) / "eval" / (task.replace(":", "_").replace("/", "_") + ".json")
        r = evaluate(emb, task, cfg.data.test_split, eval_cfg=cfg.eval, strict=cfg.data.strict,
                     max_queries=cfg.data.max_queries, output=out)
        rows.append({"task": task, "queries": r.num_queries, "NDCG@10": r.ndcg_at_10,
                     "Recall@100": r.scores.get("recall_at_100", float("nan"))})
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
