"""Runtime helpers shared by the jobs: start or join a Ray cluster the same way everywhere, check output paths, pick
a free local port, start a local S3 server."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local server the job or a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set by Ray's job manager in the environment of a `ray job submit` entrypoint (ray/_private/runtime_env/constants.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_job_path(path: str | None, name: str) -> None:
    """Refuse a relative output path under ``ray job submit``: the entrypoint runs in Ray's temporary copy of
    ``--working-dir`` (``/tmp/ray/session_…/runtime_resources/working_dir_files/…``), which goes with the session, so
    what is written there is lost and a resume cannot find it (docs/training.md#on-a-cluster)."""
    from models.config_io import ConfigError
    from models.storage import is_remote

    if path and RAY_JOB_ENV in os.environ and not is_remote(path) and not os.path.isabs(path):
        raise ConfigError(f"{name} {path!r} is a relative path: under `ray job submit` it would be written into Ray's "
                          f"temporary copy of the working dir ({os.getcwd()}), deleted with the session; give an "
                          "absolute path on storage every node sees, or an s3:// URI")


def init_ray(num_cpus: int | None = None, dashboard: bool = True, **kwargs) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a cluster
    already running on this machine); otherwise start a fresh local cluster whose node address is 127.0.0.1 — the
    embedded default never attaches to someone else's Ray by accident.

    The local cluster (docs/architecture.md#stack-pitfalls, "Ray on one machine"):
    - keeps Ray's token authentication, on by default for a new local cluster: Ray's own servers (GCS, raylet, workers)
      bind every interface, and the token is what stops another machine from running code on this one. A cluster
      started with ``RAY_AUTH_MODE=disabled`` gets a warning.
    - runs its dashboard on 127.0.0.1 only (the next free port from 8265): the state API lives there, and Ray Train's
      placement-group cleaner asks it whether the run's controller is alive — without it the cleaner cannot tell and
      logs "Failed to query Ray Train Controller actor state" every few seconds of every training run.
      ``dashboard=False`` leaves it out, for jobs that need neither (``jobs.prepare`` without ``--dashboard``): its
      head process and modules cost about 2 CPU-seconds of a short job (docs/benchmarks.md#curation).

    A no-op when Ray is already initialised (tests share one session-wide cluster).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            log.warning("RAY_AUTH_MODE=disabled: this local Ray cluster runs without token authentication, and its "
                        "servers listen on every interface; firewall the machine, or unset RAY_AUTH_MODE")
        where = {"dashboard_host": "127.0.0.1"} if dashboard else {}
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, _node_ip_address="127.0.0.1",
                 **where, **kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())


# A local S3 endpoint for benchmarks and tests: moto_server (the dev extra) on 127.0.0.1 with the standard AWS variables
# pointing at it, so every S3 client of the process (s3fs, boto3, pyarrow) talks to it.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3(start_timeout_s: float = 30.0) -> Iterator[str]:
    """Start moto_server, point the AWS variables at it and yield its endpoint URL; stop it and restore the variables
    on exit."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        raise RuntimeError(f"no {moto}: the local S3 server comes with the dev extra (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + start_timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", *AWS_VARIABLES)}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, **AWS_VARIABLES)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_bucket(endpoint: str, prefix: str = "bench") -> str:
    """A fresh bucket (made with boto3: s3fs's mkdir fails against moto)."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=AWS_VARIABLES["AWS_REGION"]).create_bucket(Bucket=name)
    return name
