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
    assert any("stm-ray[gpu]" in c for c in cfg["setup_commands"])
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
    assert cfg.run_dir.startswith(("s3://", "gs://")) and cfg.staging_dir


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.install.yaml"])
def test_runtime_envs_are_valid(name):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / name).read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert "runs/" in env["excludes"]
    if "install" in name:
        assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]"]
