"""LoRA adapters (peft) on Next-DiT: the adapter folders written by ``jobs.export`` of a LoRA run, on their base model.

Two ways to hold one (docs/architecture.md#model-folder):

- **merged** (``merge_adapter``): the adapter is added into the base model's weights, in place; each merged variant is
  a model of its own, which costs exactly what the base costs per step, and as much memory.
  ``Sampler.from_pretrained(..., adapter=...)`` does this by default: a standalone sampler of one LoRA model has no
  other variant to share its base with, so merging saves the adapter's compute at no cost.
- **unmerged on one shared base** (``LoraAdapters``): several named adapters are loaded side by side on one base
  model, whose weights stay a single copy; a solve runs with one of them active, or none (the base itself). An
  adapter adds its ``r × (in + out)`` weights per targeted projection (14 MiB at rank 16 on the 179 M-parameter audio
  preset) and a little compute per step (docs/benchmarks.md#lora-adapters-on-one-base-cpu). The Serve replicas hold
  their LoRA model ids this way.

An adapter that does not fit the base (target modules it lacks, other shapes, other layers) is a ``ValueError`` that
names the adapter folder, and leaves the base and its other adapters as they were.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from models.storage import local_path


def merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """``model`` with the peft LoRA adapter folder ``adapter`` (local or s3://) merged into its weights."""
    adapters = LoraAdapters(model)
    adapters.load(adapter, adapter)  # the same checks as an unmerged adapter
    return adapters.merge(adapter)


class LoraAdapters:
    """One base model and the peft LoRA adapters loaded unmerged on it, by name.

    peft injects its LoRA layers into ``model`` in place (each targeted ``nn.Linear`` becomes a LoRA layer around the
    same ``nn.Linear``), so the base weights are never copied and ``model`` itself computes with whichever adapter is
    active. Which one is active is state of the shared module: every use of the model goes through ``active(name)``,
    which holds a lock for the whole ``with`` block, so two threads never run it at once with different adapters, and
    loading or deleting an adapter waits for the solve in progress."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._peft = None  # the PeftModel around ``model``, once an adapter is loaded
        # our name → peft's: peft's names become module names (no dots) and its key filters match them as substrings,
        # while ours are model ids and folder paths
        self._keys: dict[str, str] = {}
        self._loaded = 0
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def load(self, name: str, folder: str) -> None:
        """Load the peft LoRA adapter folder ``folder`` (local or s3://) as ``name``, unmerged and inactive."""
        from peft import PeftConfig, PeftModel, PeftType

        path = local_path(folder)
        try:
            config = PeftConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot load a LoRA adapter from {folder!r}: {exc}") from exc
        if config.peft_type != PeftType.LORA:
            raise ValueError(f"{folder!r} is a {config.peft_type} adapter; only LoRA adapters are supported")
        config.inference_mode = True
        with self._lock:
            if name in self._keys:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
            self._loaded += 1
            key = f"adapter_{self._loaded}"
            try:
                if self._peft is None:
                    self._peft = PeftModel(self.model, config, key)  # injects the LoRA layers into self.model
                result = self._peft.load_adapter(path, key)  # an unknown key is injected first, then loaded
                # peft loads with strict=False: keys of modules the base lacks, or LoRA layers left without weights,
                # mean the adapter was trained on another base
                missing = [k for k in result.missing_keys if f".{key}." in k]
                if result.unexpected_keys or missing:
                    raise ValueError(f"weights for modules this base lacks: {result.unexpected_keys[:3]}"
                                     if result.unexpected_keys else f"no weights for {missing[:3]}")
            except (ValueError, RuntimeError, KeyError) as exc:  # peft: no target module found; a shape mismatch
                self._drop(key)
                lines = str(exc).replace(f".{key}.", ".").strip().splitlines()  # load_state_dict: one line a tensor
                detail = " ".join(line.strip() for line in lines[:2]) + (" …" if len(lines) > 2 else "")
                raise ValueError(f"the LoRA adapter {folder!r} does not fit this base model (targets "
                                 f"{sorted(config.target_modules)}): {detail}") from exc
            self._keys[name] = key

    def delete(self, name: str) -> None:
        """Unload the adapter ``name``; with the last one the model gets its plain layers back."""
        with self._lock:
            self._drop(self._keys.pop(name))

    def merge(self, name: str) -> torch.nn.Module:
        """The model with the adapter ``name`` merged into its weights and every adapter unloaded (``merge_adapter``)."""
        with self._lock:
            merged = self._peft.merge_and_unload(adapter_names=[self._keys.pop(name)])
            self._keys.clear()
            self._peft = None
        return merged

    def _drop(self, key: str) -> None:
        """Remove peft's adapter ``key`` if it got that far (the lock is held)."""
        if self._peft is None:
            return
        others = [k for k in self._peft.peft_config if k != key]
        if key in self._peft.peft_config:
            if others and key in self._peft.active_adapters:  # else peft warns that it activates another in its place
                self._peft.set_adapter(others[0], inference_mode=True)
            self._peft.delete_adapter(key)
        if not self._peft.peft_config:  # no adapter left: unwrap the LoRA layers, back to the plain base
            self._peft.unload()
            self._peft = None

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[torch.nn.Module]:
        """``with adapters.active(name) as model:`` ``model`` computes with the adapter ``name`` (None: the base alone)
        until the block ends; other threads' blocks wait."""
        with self._lock:
            if name is not None and name not in self._keys:
                raise KeyError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(self._keys)})")
            if self._peft is None:
                yield self.model
            elif name is None:
                with self._peft.disable_adapter():
                    yield self.model
            else:
                self._peft.set_adapter(self._keys[name], inference_mode=True)
                yield self.model
