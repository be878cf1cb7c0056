"""Small builders shared by tests: random-initialised models, inputs."""

from __future__ import annotations

import torch

# The random-weight builders live in models/tiny.py (jobs build tiny models too); tests keep importing them from here.
from models.tiny import random_nextdit, randomise  # noqa: F401


def caption_batch(batch: int, length: int, dim: int, valid: list[int] | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(valid or []):
        mask[b, n:] = False
    return feats, mask


def stop_processes_matching(*patterns: str) -> None:
    """Stop a test's own Ray cluster: SIGTERM then SIGKILL to every process whose command line matches a pattern
    (its temp dir, its GCS address). `ray stop` would stop every Ray on the machine."""
    import os
    import signal
    import subprocess
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pattern in patterns:
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
            for pid in found.stdout.split():
                if int(pid) != os.getpid():
                    try:
                        os.kill(int(pid), sig)
                    except ProcessLookupError:
                        pass
        time.sleep(2)
