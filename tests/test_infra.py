"""Cluster deployment files validate the way the cluster would validate them (issue: cluster deployment, infra/)."""

from __future__ import annotations

import copy
import functools
import re

import jsonschema
import pytest
import yaml

from tests.conftest import REPO_ROOT

CRD_DIR = REPO_ROOT / "tests" / "data" / "kuberay-crds"  # vendored (see its README): the check never skips
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = sorted((REPO_ROOT / "infra" / "kuberay").glob("*.yaml"))


@functools.cache  # the CRDs are megabytes of YAML and schema: parse and check each once per session
def crd_validator(kind: str, version: str):
    path = CRD_DIR / CRD_FILES[kind]
    assert path.exists(), f"KubeRay CRD {path} is missing: it is vendored with the tests, restore it"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = entry["schema"]["openAPIV3Schema"]
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)  # what jsonschema.validate checks first
            return cls(schema)
    raise AssertionError(f"{kind} CRD has no version {version}")


def validate_manifest(doc: dict) -> None:
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    crd_validator(doc["kind"], version).validate(doc)


def test_there_is_a_manifest_of_every_kind():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_its_crd(path):
    for doc in yaml.safe_load_all(path.read_text()):
        validate_manifest(doc)


def test_a_broken_manifest_is_rejected():
    doc = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken)
    missing = copy.deepcopy(doc)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(missing)


def test_cluster_autoscales_every_worker_role_from_zero():
    spec = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) >= {"cpu", "encode-gpu", "train-gpu"}
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in groups.values())
    assert "encode_gpu" in groups["encode-gpu"]["resources"]


def test_cluster_launcher_config_validates_with_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO_ROOT / "infra" / "cluster-launcher" / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert {"head", "cpu", "encode_gpu", "train_gpu"} <= set(types)
    assert types["encode_gpu"]["resources"] == {"encode_gpu": 1} and types["encode_gpu"]["min_workers"] == 0
    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu"]["node_cfg"] = {}  # a typo of node_config
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_image_uses_the_pinned_python_and_installs_the_project_with_gpu_extras():
    dockerfile = (REPO_ROOT / "infra" / "Dockerfile").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    python = re.search(r'requires-python = ">=(\d+\.\d+)', pyproject)[1]
    assert f"ARG PYTHON=python{python}" in dockerfile
    assert "flash-attn" in dockerfile and "deepspeed==0.19.8" in dockerfile and "pip install -e" in dockerfile
    images = set(re.findall(r"image:\s*(\S+)", "".join(p.read_text() for p in MANIFESTS)))
    assert len(images) == 1  # every role runs the same project image


def test_rayservice_serves_the_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == serve_config
    schema = ServeDeploySchema.model_validate(serve_config)
    assert schema.applications[0].import_path == "serve.app:build_app"
    # the application builder accepts the args as they are written
    from models.config_io import from_dict
    from serve.config import ServeConfig

    from_dict(ServeConfig, schema.applications[0].args)
