"""LoRA adapters (peft) on Next-DiT: load an adapter folder written by ``jobs.export`` onto its base model.

The adapter is merged into the base weights at load time, so a served or sampled LoRA model costs exactly what the
base model costs per step.
"""

from __future__ import annotations

import torch

from models.storage import local_path


def apply_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """``model`` with the peft LoRA adapter folder ``adapter`` (local or s3://) merged into its weights."""
    from peft import PeftModel

    path = local_path(adapter)
    try:
        merged = PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load a LoRA adapter from {adapter!r}: {exc}") from exc
    return merged
