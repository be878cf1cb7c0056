"""Ray runtime helpers shared by the jobs: start or join a cluster the same way everywhere."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

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


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a cluster
    already running on this machine); otherwise start a fresh local cluster whose node address is 127.0.0.1 — the
    embedded default never attaches to someone else's Ray by accident, and its dashboard is off. Ray's own servers
    (GCS, raylet, workers) still bind every interface: on a shared network, firewall the machine or set Ray's token
    authentication (``RAY_AUTH_MODE=token``).

    A no-op when Ray is already initialised (tests share one session-wide cluster).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())
