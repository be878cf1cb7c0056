"""Ray runtime helpers shared by the jobs: start or join a cluster the same way everywhere."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a cluster
    already running on this machine); otherwise start a fresh local cluster on 127.0.0.1 — the embedded default never
    attaches to someone else's Ray by accident and never listens beyond loopback.

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
