"""Cluster definitions: the `ray up` YAMLs against the schema Ray ships (and Ray's own config validation), the
KubeRay manifests against the vendored ray.io/v1 schemas with every pod template checked as a Kubernetes
PodTemplate (kubernetes-validate, strict), the RayService's Serve config against Ray Serve's schema, and the job
configs and runtime envs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
KUBERAY = CLUSTERS / "kuberay"
RAY_UP = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
MANIFESTS = {"RayCluster": KUBERAY / "raycluster.yaml", "RayJob": KUBERAY / "rayjob.yaml",
             "RayService": KUBERAY / "rayservice.yaml"}
ALL_YAML = sorted([*CLUSTERS.rglob("*.yaml"), *(REPO / "jobs").rglob("*.yaml")])


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_yaml_validates(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own checks on the filled-in config

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head schedules no work"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if n.startswith("gpu")}
    cpu = {n: t for n, t in workers.items() if n.startswith("cpu")}
    assert cpu and gpu
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, f"{name} must autoscale from 0"
    # the node image (clusters/kuberay/Dockerfile: stm-ray[gpu]) is built once; nodes only install the checkout
    assert cfg["docker"]["image"].endswith("/stm-ray:0.1.0-gpu")
    assert cfg["setup_commands"] == ["pip install --quiet --no-deps -e /home/ray/stm-ray"]
    assert cfg["file_mounts"] == {"/home/ray/stm-ray": "."}
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_worker_niceness=0" in start
    assert "ray job submit" in path.read_text().split("\n\n")[0]


def test_ray_up_schema_rejects_a_typo():
    cfg = yaml.safe_load(RAY_UP[0].read_text())
    cfg["available_node_types"]["cpu"]["max_wrokers"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        jsonschema.validate(cfg, _ray_schema())


def _kuberay_schema(kind: str) -> dict:
    return json.loads((KUBERAY / "schemas" / f"{kind.lower()}_v1.json").read_text())


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _templates(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def _check_manifest(doc: dict) -> None:
    import kubernetes_validate

    jsonschema.validate(doc, _kuberay_schema(doc["kind"]))
    for group, template in _templates(doc):
        try:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                                          "template": template}, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']} group {group}: {e}") from None


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_manifest_validates(kind):
    doc = yaml.safe_load(MANIFESTS[kind].read_text())
    assert doc["kind"] == kind
    _check_manifest(doc)
    spec = _cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert any(n.startswith("cpu") for n in groups) and any(n.startswith("gpu") for n in groups)
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["maxReplicas"] > 0
    assert spec["enableInTreeAutoscaling"] is True
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for n, t in _templates(doc) if n.startswith("gpu")
                  for c in t["spec"]["containers"]]
    assert gpu_limits and all(gpu_limits)
    for _, t in _templates(doc):  # secrets come from a Secret, never from the manifest
        for c in t["spec"]["containers"]:
            assert {"secretRef": {"name": "stm-ray-secrets", "optional": True}} in c.get("envFrom", [])
            assert not any(re.search(r"TOKEN|KEY|SECRET", e.get("name", "")) and "value" in e for e in c.get("env", []))


@pytest.mark.parametrize("broken", ["kuberay-field", "pod-field", "enum"])
def test_kuberay_validation_catches_mistakes(broken):
    doc = yaml.safe_load(MANIFESTS["RayJob"].read_text())
    if broken == "kuberay-field":
        doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    elif broken == "pod-field":
        doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    else:
        doc["spec"]["submissionMode"] = "K8sMode"
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        _check_manifest(doc)


def test_rayjob_runs_the_pipeline_entrypoint():
    doc = yaml.safe_load(MANIFESTS["RayJob"].read_text())
    parts = doc["spec"]["entrypoint"].split()
    assert parts[0] == "python"
    for p in parts[1:3]:
        assert (REPO / Path(p).relative_to("/home/ray/stm-ray")).is_file(), p
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def test_rayservice_serve_config_is_ours():
    from ray.serve.schema import ServeDeploySchema

    from stm_ray.serve.app import resolve_args
    from stm_ray.serve.deploy import IMPORT_PATH

    doc = yaml.safe_load(MANIFESTS["RayService"].read_text())
    schema = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    app = schema.applications[0]
    assert app.import_path == IMPORT_PATH
    args = resolve_args(dict(app.args))
    assert args["token_env"] and args["model"].endswith("/merged")
    assert schema.http_options.host == "0.0.0.0"  # inside the pod; the Kubernetes Service is the way in


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load_and_name_their_submit_command(path):
    from stm_ray.config import load_config

    cfg = load_config(path)
    head = path.read_text().split("\n")[:6]
    submit = next(line for line in head if "ray job submit" in line)
    script = re.search(r"python (jobs/\w+\.py) (\S+)", submit)
    assert script and (REPO / script.group(1)).is_file() and script.group(2) == str(path.relative_to(REPO))
    assert cfg.data.tasks


def test_gpu_cluster_config_is_the_realistic_run():
    from stm_ray.config import load_config

    cfg = load_config(REPO / "jobs" / "configs" / "gpu-cluster.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen3-0.6B" and "7B" in cfg.synth.generator
    assert len(cfg.data.tasks) == 4 and cfg.synth.expert_by == "task"  # four sources: four experts
    assert cfg.synth.use_gpu and cfg.train.use_gpu and cfg.synth.concurrency[1] > cfg.synth.concurrency[0]
    assert cfg.run_dir.startswith(("s3://", "gs://"))


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.install.yaml"])
def test_runtime_envs_are_valid(name):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / name).read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert "runs/" in env["excludes"]
    if "install" in name:
        assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]"]


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_nodes_install_nothing_heavy(path):
    """An autoscaled node pulls the prebuilt image; no command on it installs torch or vLLM again."""
    cfg = yaml.safe_load(path.read_text())
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in cfg.get(key, [])]
    assert commands
    for c in commands:
        assert not re.search(r"torch|vllm|\[gpu\]", c, re.IGNORECASE), c
        if re.search(r"\bpip3? install\b", c) and "google-api-python-client" not in c:  # Ray's GCP autoscaler's
            assert "--no-deps" in c, c
    assert "rayproject/ray" not in cfg["docker"]["image"], "the plain Ray image lacks stm-ray's dependencies"
    assert any("--shm-size" in o for o in cfg["docker"]["run_options"])


def _walk(node, key=None):
    """(key, value) of every node of a parsed YAML document (key None for list items and the root)."""
    yield key, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize("path", [*ALL_YAML, KUBERAY / "Dockerfile"], ids=lambda p: str(p.relative_to(REPO)))
def test_no_shared_staging_mount_is_required(path):
    """Run directories are object storage used directly: nothing sets staging_dir, needs STM_RAY_STAGING or mounts
    a shared volume."""
    text = path.read_text()
    assert "STM_RAY_STAGING" not in text and "/mnt/stm-ray" not in text
    for doc in ([] if path.name == "Dockerfile" else yaml.safe_load_all(text)):
        nodes = list(_walk(doc))
        assert not {"staging_dir", "persistentVolumeClaim"} & {k for k, _ in nodes}
        assert "ReadWriteMany" not in {v for _, v in nodes if isinstance(v, str)}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_ray_containers_mount_memory_shm(kind):
    """Ray's object store lives in /dev/shm; a container's 64 MB default would push it to disk."""
    doc = yaml.safe_load(MANIFESTS[kind].read_text())
    for group, t in _templates(doc):
        volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
        for c in t["spec"]["containers"]:
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert len(shm) == 1, f"{kind} {group} {c['name']}: no /dev/shm mount"
            empty_dir = volumes[shm[0]["name"]].get("emptyDir")
            assert empty_dir and empty_dir["medium"] == "Memory" and empty_dir.get("sizeLimit"), (kind, group)


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, simplified (no `!`): a pattern matching the path or one of its parents."""
    parts = path.split("/")
    for pat in patterns:
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore_keeps_the_build_context_small():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert "docker build -f clusters/kuberay/Dockerfile" in dockerfile and "COPY --chown=ray:users . " in dockerfile
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for out in [".venv/bin/python", ".venv-infinity/lib/x.py", "runs/demo/manifest.json", ".git/HEAD",
                "stm_ray/__pycache__/cli.cpython-311.pyc", "stm_ray.egg-info/PKG-INFO", ".pytest_cache/v",
                ".ruff_cache/x"]:
        assert _dockerignored(patterns, out), out
    for keep in ["pyproject.toml", "README.md", "stm_ray/cli.py", "stm_ray/configs/demo.yaml", "jobs/pipeline.py",
                 "jobs/configs/gpu-cluster.yaml"]:  # what `pip install .[gpu]` and the RayJob entrypoint need
        assert not _dockerignored(patterns, keep), keep


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_run_dir_is_not_relative(path):
    """Under `ray job submit --working-dir .` a relative run_dir lands in Ray's temporary copy of the working dir."""
    run_dir = str(yaml.safe_load(path.read_text())["run_dir"])
    assert "://" in run_dir or Path(run_dir).expanduser().is_absolute(), run_dir
