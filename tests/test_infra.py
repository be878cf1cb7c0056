"""Cluster deployment files validate the way the cluster would validate them (issue: cluster deployment, infra/)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

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
    assert "flash-attn" in dockerfile and "deepspeed==0.19.8" in dockerfile and "pip install -e ." in dockerfile
    assert "[dev]" not in dockerfile and re.search(r"apt-get install[^\n]*\bwget\b", dockerfile)  # probes use wget
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


# ---- every manifest's entrypoint runs --------------------------------------------------------------------------------
RAYJOBS = [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayJob"]
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "SERVE_API_TOKEN")


@pytest.fixture
def my_bucket(tmp_path):
    """A local folder standing in for the manifests' s3://my-bucket/, holding what their dry-runs read: a prepared data
    set at curated/v1 (one bucket with one global batch for 16 workers) and a tiny text encoder at models/gemma-2b."""
    from tests.test_train import _tiny_shards
    from tests.tiny_models import make_tiny_text_encoder

    root = tmp_path / "my-bucket"
    _tiny_shards(root / "curated" / "v1", with_text=False, samples=32)
    make_tiny_text_encoder(root / "models" / "gemma-2b")
    return root


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_with_dry_run(path, my_bucket, monkeypatch, capsys):
    """Each RayJob's entrypoint, as written (its bucket mapped to a local folder), under its runtime env's env_vars,
    passes the job's own --dry-run: every flag and --set key is real and every check before the cluster passes."""
    import importlib
    import shlex

    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(path.read_text())["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # the image's WORKDIR holds the source (infra/Dockerfile); here the repository is that folder
    assert runtime_env["working_dir"] == "/app" and "WORKDIR /app" in (REPO_ROOT / "infra" / "Dockerfile").read_text()
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO_ROOT)})  # Ray's own validation of the runtime env
    env_vars = runtime_env.get("env_vars", {})
    assert not set(env_vars) & set(SECRET_NAMES), "credentials come from the pods' secretRef, never the runtime env"
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    argv = [arg.replace("s3://my-bucket", str(my_bucket)) for arg in shlex.split(spec["entrypoint"])]
    assert argv[:2] == ["python", "-m"]
    assert importlib.import_module(argv[2]).main(argv[3:] + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    if argv[2] == "jobs.train":
        assert "workers: 16 (GPU)" in out and "preset 2B-GQA" in out
        assert "wandb: online (from WANDB_MODE)" in out  # the runtime env's switch wins over the config default


def test_rayjob_train_workers_ask_for_the_train_gpu_resource():
    """The training RayJob's flags build the ScalingConfig that puts one worker per GPU on the train-gpu group."""
    import shlex

    from jobs.training.config import TrainJobConfig
    from jobs.training.driver import build_trainer
    from models.config_io import resolve_config

    spec = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "rayjob-train.yaml").read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    cfg = resolve_config(TrainJobConfig, None, None, {"scaling.workers": 16, "scaling.gpu": True,
                                                      "run.storage": "s3://my-bucket/runs"}, overrides)
    scaling = build_trainer(cfg).scaling_config
    assert scaling.num_workers == 16 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "train_gpu": 1.0}
    cluster = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    train_group = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "train-gpu")
    assert "train_gpu" in train_group["resources"]


def test_rayservice_app_builds_from_its_import_path_and_args():
    """serveConfigV2's import path and args build the application (as `serve deploy` does, without starting Serve),
    and every deployment override names a deployment of the app with options it accepts."""
    import importlib

    from ray.serve._private.build_app import build_app  # what `serve deploy` / `serve run` turn an app into
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    for app_config in ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications:
        module, attr = app_config.import_path.split(":")
        app = getattr(importlib.import_module(module), attr)(app_config.args)
        deployments = {d.name: d for d in build_app(app, name=app_config.name).deployments}
        for override in app_config.deployments:
            options = override.model_dump(exclude_unset=True)
            assert options.pop("name") in deployments, f"{override.name} is no deployment of {app_config.import_path}"
            deployments[override.name].options(**options)


def test_rayservice_workers_are_ready_only_when_the_app_can_generate():
    """The GPU workers' readiness probe asks the app's GET /readyz through the pod's own Serve proxy, after the raylet
    check of KubeRay's default probe it replaces; the head keeps KubeRay's probes, since KubeRay deploys the app only
    once the head is ready (docs/architecture.md#health-and-readiness)."""
    from serve.app import api

    service = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head and "livenessProbe" not in head
    assert "/readyz" in api.openapi()["paths"]
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert "livenessProbe" not in container  # liveness stays KubeRay's: a loading sampler never restarts a pod
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["bash", "-c"]
        commands = shell_commands(probe[2])
        urls = [c[-1] for c in commands if c[0] == "curl"]
        assert urls == ["http://localhost:52365/api/local_raylet_healthz", f"http://localhost:{port}/readyz"], urls
        assert all("-f" in c or "-fsS" in c for c in commands if c[0] == "curl")  # a 503 fails the probe
        assert container["readinessProbe"]["timeoutSeconds"] > 5  # above curl's -m 5 for /readyz


def shell_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ; && || |)."""
    import shlex

    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def test_cluster_launcher_commands_parse_with_rays_cli():
    """The launcher's setup and start commands: valid shell, and each `ray …` parses with this Ray's own CLI (its
    options and their types). They are not run here: `ray stop` would stop every Ray on this machine and the head's
    autoscaler would call AWS."""
    import subprocess

    from ray.scripts.scripts import cli

    config = yaml.safe_load((REPO_ROOT / "infra" / "cluster-launcher" / "aws.yaml").read_text())
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    ray_commands = []
    for key in keys:
        for line in config[key]:
            subprocess.run(["bash", "-n", "-c", line], check=True)  # syntax only
            ray_commands += [c for c in shell_commands(line) if c[0] == "ray"]
    started = {}
    for command in ray_commands:
        sub = cli.get_command(None, command[1])
        assert sub is not None, f"`ray {command[1]}` is no Ray command"
        started.setdefault(command[1], []).append(sub.make_context(command[1], command[2:]).params)
    head, worker = started["start"]
    assert head["head"] and head["port"] == 6379 and head["autoscaling_config"]
    assert worker["address"] == "$RAY_HEAD_IP:6379"


# ---------------------------------------------------------------------------------------------------------------------
# Observability: infra/observability/ scrapes every Ray pod and draws only metrics that exist
OBSERVABILITY = REPO_ROOT / "infra" / "observability"
SUFFIXES = re.compile(r"_(total|bucket|sum|count)$")  # what Prometheus adds to a counter's or a histogram's name


def ray_groups():
    """(manifest, group spec) of every head and worker group of the cluster manifests (RayCluster, RayService)."""
    for path in MANIFESTS:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterConfig", doc["spec"]) if doc["kind"] == "RayService" else doc["spec"]
        if "headGroupSpec" in spec:
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                yield path.name, group


def test_the_podmonitor_scrapes_the_metrics_port_of_every_ray_container():
    monitor = yaml.safe_load((OBSERVABILITY / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}  # KubeRay's label of Ray pods
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    groups = list(ray_groups())
    assert len(groups) >= 5
    for manifest, group in groups:
        port = int(group["rayStartParams"]["metrics-export-port"])
        for container in group["template"]["spec"]["containers"]:
            named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert named.get(endpoint["port"]) == port, (manifest, group.get("groupName", "head"), container["name"])


def defined_lumina_metrics() -> set[str]:
    """Every ray.util.metrics name the code defines: serve/ and jobs/ sources, and the training gauges."""
    from jobs.training.metrics import PROMETHEUS_GAUGES

    names = set(PROMETHEUS_GAUGES.values())
    for path in [*(REPO_ROOT / "serve").rglob("*.py"), *(REPO_ROOT / "jobs").rglob("*.py")]:
        names |= set(re.findall(r"(?:Counter|Gauge|Histogram)\(\s*\"(lumina_\w+)\"", path.read_text()))
    return names


def test_the_grafana_dashboard_draws_every_lumina_metric_and_only_metrics_that_exist():
    import json

    import ray

    dashboard = json.loads((OBSERVABILITY / "grafana-lumina.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    drawn = {SUFFIXES.sub("", name) for e in exprs for name in re.findall(r"\bray_(\w+)", e)}
    ours = defined_lumina_metrics()
    assert {"lumina_http_requests", "lumina_images_generated", "lumina_train_loss"} <= ours
    assert {n for n in drawn if n.startswith("lumina_")} == ours  # nothing drawn that is not defined, nothing left out
    ray_source = "\n".join(p.read_text(errors="ignore") for sub in ("serve/_private", "dashboard/modules/reporter")
                           for p in (Path(ray.__file__).parent / sub).rglob("*.py"))
    for name in drawn - ours:  # Ray's own metrics: names Ray's installed source defines
        assert f'"{name}"' in ray_source, f"ray_{name} is not a metric of Ray {ray.__version__}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])  # Grafana keys panels by id
