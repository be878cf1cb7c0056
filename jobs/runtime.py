"""Ray runtime helpers shared by the jobs: start or join a cluster the same way everywhere."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or the one ``ray job submit`` runs in); otherwise start a local one.

    A no-op when Ray is already initialised (tests share one session-wide cluster).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())
