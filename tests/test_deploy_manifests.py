"""deploy/: every manifest parses, uses KubeRay/Kubernetes kinds, and sets its resources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[dict]:
    return [doc for path in K8S_FILES for doc in documents(path)]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in all_documents() if doc["kind"] == kind]


def pod_containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_manifest_parses_with_known_kind_and_namespace(path):
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) in KNOWN_KINDS, f"{path.name}: {doc['apiVersion']} {doc['kind']}"
        assert doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "slowfast"


def test_every_container_requests_cpu_and_memory():
    templates = [d["spec"]["template"] for d in by_kind("Deployment")]
    for cluster in by_kind("RayCluster"):
        templates.append(cluster["spec"]["headGroupSpec"]["template"])
        templates += [group["template"] for group in cluster["spec"]["workerGroupSpecs"]]
    assert templates
    for template in templates:
        for container in pod_containers(template):
            requests = container["resources"]["requests"]
            assert "cpu" in requests and "memory" in requests, container["name"]
            assert container["resources"]["limits"]["memory"] == requests["memory"], container["name"]


def test_ray_cluster_groups_head_ingest_and_gpu():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"ingest", "gpu"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "ingest" in groups["ingest"]["rayStartParams"]["resources"]
    gpu = pod_containers(groups["gpu"]["template"])[0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    assert groups["gpu"]["template"]["spec"]["tolerations"]


def test_ray_job_runs_the_pipeline_on_the_cluster():
    (job,) = by_kind("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "slowfast"}
    assert job["spec"]["entrypoint"] == "slowfast run --ray-address auto -c /config/slowfast.yaml"


def test_redis_url_comes_from_the_secret():
    (cluster,) = by_kind("RayCluster")
    env = {e["name"]: e for e in pod_containers(cluster["spec"]["headGroupSpec"]["template"])[0]["env"]}
    redis_env = [e for name, e in env.items() if "REDIS" in name]
    assert redis_env and all(e["valueFrom"]["secretKeyRef"]["name"] == "slowfast-redis" for e in redis_env)


def test_compose_file_parses_with_gpu_reservation():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"redis", "slowfast"}
    devices = compose["services"]["slowfast"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("\nFROM ") >= 2
    assert "USER slowfast" in text and "HEALTHCHECK" in text and "HF_HOME=/models" in text
    assert "[gpu]" in text


def test_configmap_config_validates_against_the_pipeline_config(monkeypatch):
    from pipeline.config import PipelineConfig

    (configmap,) = by_kind("ConfigMap")
    data = yaml.safe_load(configmap["data"]["slowfast.yaml"])
    monkeypatch.setenv("SLOWFAST_REDIS_URL", "redis://:pw@slowfast-redis:6379/0")  # from the Secret
    config = PipelineConfig.model_validate(data)
    assert config.streams and config.ingest_node_resource == "ingest"
    assert "redis_url" not in data  # the URL and its password come from the Secret only
    # the resource the config prefers for ingest is the one the ingest group provides
    (cluster,) = by_kind("RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert config.ingest_node_resource in groups["ingest"]["rayStartParams"]["resources"]
