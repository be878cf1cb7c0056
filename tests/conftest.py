"""Shared fixtures: real local services (a Ray cluster on 127.0.0.1, an S3 server), all started here and stopped after."""

from __future__ import annotations

import inspect
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.runtime import free_port, local_s3, new_bucket  # noqa: F401 - free_port: the tests' import of it

# Everything local stays on loopback; no weights or data from any hub; wandb offline (DEVELOPERS.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, to take their reports and to see them finish: a tiny
# test run waits on that poll at each checkpoint and at its end. Set before the cluster starts (its workers inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO_ROOT = Path(__file__).resolve().parent.parent


# Two tiers. `./scripts/test.sh -m "not integration"` is the quick one: pure CPU math and contracts. Nobody marks
# `integration` by hand (a hand-kept list drifts): a test is integration when its source, the source of a fixture it
# uses, or that of a tests/ function they call by name starts a process (Ray, the S3 server, Serve, a subprocess or a
# multiprocessing worker), i.e. matches STARTS_A_PROCESS. Fixtures count through their own fixtures too (an item's
# fixtures are the transitive closure: s3_bucket brings in s3_server), so every user of ray_cluster, s3_server,
# s3_bucket or serve's `server` is integration. A process the source does not show (started deep inside a job's code)
# still cannot slip into the quick tier: `quick_tier_guard` fails the test.
STARTS_A_PROCESS = re.compile(
    r"\bsubprocess\.|\bmultiprocessing\b|\bray\.init\(|\binit_ray\(|\bserve\.(?:run|start)\(|moto_server")
NOT_SCANNED = {"quick_tier_guard"}  # the guard names what it refuses; it starts nothing


def starts_a_process(func, seen: set) -> bool:
    """Whether ``func``'s source, or that of a function of tests/ it calls by name (run_bench, …), starts a process."""
    if func in seen:
        return False
    seen.add(func)
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):  # built-ins: pytest's own fixtures start nothing
        return False
    if STARTS_A_PROCESS.search(source):
        return True
    namespace = getattr(inspect.getmodule(func), "__dict__", {})
    for name in set(re.findall(r"\b(\w+)\(", source)):
        helper = namespace.get(name)
        if inspect.isfunction(helper) and helper.__module__.startswith("tests") and starts_a_process(helper, seen):
            return True
    return False


def is_integration(item) -> bool:
    seen: set = set()
    fixtures = [defs[-1].func for name, defs in item._fixtureinfo.name2fixturedefs.items() if name not in NOT_SCANNED]
    return any(starts_a_process(func, seen) for func in [item.function, *fixtures])


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if is_integration(item):
            item.add_marker(pytest.mark.integration)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


PROCESS_MACHINERY = (subprocess.__file__, os.path.dirname(multiprocessing.__file__))  # frames that only pass a call on


def called_from_project_code() -> bool:
    """Whether the code asking for a process (the innermost caller outside subprocess / multiprocessing) is this
    repository's. Libraries' own helper processes are part of the math and stay allowed: torch.compile and DeepSpeed
    run g++, inductor its compile workers."""
    frame = sys._getframe(2)  # skip this function and the patched method
    while frame is not None and frame.f_code.co_filename.startswith(PROCESS_MACHINERY):
        frame = frame.f_back
    filename = frame.f_code.co_filename if frame is not None else ""
    return filename.startswith(str(REPO_ROOT)) and "site-packages" not in filename


@pytest.fixture(autouse=True)
def quick_tier_guard(request, monkeypatch):
    """A test outside the integration tier whose code starts Ray, a subprocess or a multiprocessing process anyway
    fails, naming what it started, in every run (so CI catches what the rule above missed, not only the quick tier).
    Patching Popen.__init__ and Process.start keeps them classes (libraries subclass them)."""
    if request.node.get_closest_marker("integration"):
        return

    def refuse(what: str):
        pytest.fail(f"this test starts {what}; it must be marked integration (the conftest rule missed it: teach "
                    f"STARTS_A_PROCESS in tests/conftest.py what starts it)")

    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def popen(self, *args, **kwargs):
        if called_from_project_code():
            refuse(f"a subprocess ({args[0] if args else kwargs.get('args')})")
        popen_init(self, *args, **kwargs)

    def start(self):
        if called_from_project_code():
            refuse(f"a process ({self.name})")
        process_start(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)  # multiprocessing forks without Popen
    # ray.init() (also the implicit one of ray.data, ray.remote, …) starts a cluster from Ray's own code, which the
    # Popen check lets through
    monkeypatch.setattr("ray.init", lambda *args, **kwargs: refuse("Ray (ray.init)"))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session, on 127.0.0.1. Its nodes hold the S3 server's credentials in their
    environment, as a real cluster's nodes do (KubeRay secretRef, instance profiles): Ray workers inherit their raylet's
    environment, and the jobs forward no credential through the runtime env (docs/training.md#credentials-on-a-cluster),
    so the variables must be set before the cluster starts."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical CPUs: lets 2 train workers + data tasks coexist on a 2-core CI machine
            include_dashboard=True,  # on loopback, as jobs.runtime.init_ray has it: the state API Ray Train asks
            dashboard_host="127.0.0.1",
            _metrics_export_port=free_port(),  # Ray's metrics agent: tests scrape what the jobs export
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto_server) on 127.0.0.1 with the standard AWS variables pointing at it."""
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server."""
    return new_bucket(s3_server, "test")
