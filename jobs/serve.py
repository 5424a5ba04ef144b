"""Ray job entrypoint: deploy the run's merged retriever on Ray Serve (the `serve` stage of `stm-ray run`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve.py jobs/configs/local.yaml --corpus icd10 serve.max_replicas=4

Arguments: a pipeline config YAML, optionally `--corpus TASK` (indexes it for /search), then key=value overrides.
It is `stm-ray run CONFIG --stages serve --no-block`: the CLI's own entry, with its checks and errors. Serves
<run_dir>/merged (falls back to model.name_or_path when the run has no merged model yet). The job ends once the
application is up; the application keeps running on the cluster (`serve shutdown` or `serve delete stm-ray` stops
it). For a long-lived service prefer a Serve config (`stm-ray serve RUN --write-config serve.yaml`, then
`serve deploy serve.yaml`) or a KubeRay RayService.

Where it listens is the caller's choice, never widened here: serve.host defaults to 127.0.0.1. Serve runs its HTTP
proxy on every node, each bound to that same address, so on a cluster it must be one every node has:
- keep loopback and reach the head through a tunnel (`ray attach clusters/aws.yaml -p 8000`, or
  `kubectl port-forward` to the head pod), the safe default;
- or pass serve.host=0.0.0.0 on purpose, with serve.token_env set, where the cluster's private network (security
  group, firewall) is the boundary;
- serve.host=<a node's address> fits a one-node cluster only: the proxies of the other nodes cannot bind it.
A KubeRay RayService sets the address in its own Serve config instead (clusters/kuberay/rayservice.yaml: 0.0.0.0
inside the pod, commented there).
"""

from __future__ import annotations

import sys

from stm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", "--no-progress", "--no-block", "--stages", "serve", *sys.argv[1:]]))
