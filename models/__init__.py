"""The Next-DiT model library: pure PyTorch (no Ray). Networks, RoPE, attention, flow matching, encoders, checkpoints.

Public names are imported lazily, so light modules (``models.config_io``, ``models.storage``) stay cheap to import in
data workers that never touch torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NextDiT": "models.nextdit",
    "ContextDrop": "models.nextdit",
    "NextDiTConfig": "models.presets",
    "PRESETS": "models.presets",
    "preset": "models.presets",
    "RopeScaling": "models.rope",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
