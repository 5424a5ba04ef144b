"""Ray job entrypoint: deploy the run's merged retriever on Ray Serve (the `stm-ray serve` stage).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve.py jobs/configs/local.yaml --corpus icd10 serve.max_replicas=4

Arguments: a pipeline config YAML, optionally `--corpus TASK` (indexes it for /search), then key=value overrides.
Serves <run_dir>/merged (falls back to model.name_or_path when the run has no merged model yet). The job ends once
the application is up; the application keeps running on the cluster (`serve shutdown` or `serve delete stm-ray`
stops it). For a long-lived service prefer a Serve config (`stm-ray serve RUN --write-config serve.yaml`,
then `serve deploy serve.yaml`) or a KubeRay RayService.
"""

from __future__ import annotations

import sys

from stm_ray.config import load_config
from stm_ray.pipeline import serve_run
from stm_ray.utils import setup_logging


def main(argv: list[str]) -> int:
    setup_logging()
    corpus = None
    if "--corpus" in argv:
        i = argv.index("--corpus")
        corpus = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(argv[0] if argv else None, argv[1:])
    info = serve_run(cfg, corpus, show_progress=False)
    print(f"serving {info['model']} at {info['url']} (/v1/embeddings{', /search' if corpus else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
