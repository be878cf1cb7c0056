"""Checkpoint files: our model folder, the official Lumina-Next release, diffusers ``LuminaNextDiT2DModel``.

Reading and writing, local or s3://; the layouts' key and config mappings are ``models/formats.py``. Everything here
speaks (config, official-layout state dict, metadata): building the module from them is ``NextDiT.from_state_dict``,
so this module does not import the network.

Folders:
- ours: ``config.json`` (``{"format": OUR_FORMAT, "model": NextDiTConfig, ...references}``), ``model.safetensors``,
  optionally ``ema.safetensors``;
- official: ``consolidated.00-of-01.{pth,safetensors}`` (+ ``consolidated_ema.…``) and ``model_args.pth``;
- diffusers: ``config.json`` with ``_class_name: LuminaNextDiT2DModel`` and ``diffusion_pytorch_model.safetensors``.
``.pth`` files are read with ``torch.load(weights_only=True)``: a checkpoint never executes code.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.config_io import from_dict, to_dict
from models.formats import (
    DIFFUSERS_CLASS,
    CheckpointError,
    config_from_diffusers,
    config_from_official,
    config_to_diffusers,
    diffusers_to_official,
    official_args,
    official_to_diffusers,
)
from models.presets import NextDiTConfig
from models.storage import filesystem, is_remote, local_copy, resolve_hub, staged_output

OUR_FORMAT = "lumina-ray/nextdit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
OFFICIAL_ARGS_FILE = "model_args.pth"
OFFICIAL_WEIGHTS = "consolidated.00-of-01"
OFFICIAL_EMA_WEIGHTS = "consolidated_ema.00-of-01"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMATS = ("ours", "official", "diffusers")


# ---------------------------------------------------------------------------------------------------------------------
def _load_tensors(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ``shapes_only`` reads no tensor data (meta tensors from a safetensors header, or a
    memory-mapped ``.pth`` whose pages are never touched)."""
    if path.suffix == ".safetensors":
        if not shapes_only:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=shapes_only)
        except RuntimeError:
            if not shapes_only:
                raise
            # a legacy (pre-zip) .pth cannot be memory-mapped: read it whole
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors of many kinds
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return state


def _load_official_args(path: Path) -> argparse.Namespace | dict | None:
    if not path.exists():
        return None
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read model args with weights_only=True ({exc})") from exc


def detect_format(path: Path) -> str:
    if path.is_file():
        return "official"
    config = path / CONFIG_FILE
    if config.exists():
        data = json.loads(config.read_text())
        if data.get("_class_name") == DIFFUSERS_CLASS:
            return "diffusers"
        if data.get("format") == OUR_FORMAT:
            return "ours"
        if (path / "transformer" / CONFIG_FILE).exists():
            return "diffusers"
        raise CheckpointError(f"{config}: neither our model folder nor a diffusers {DIFFUSERS_CLASS} config")
    if (path / "transformer" / CONFIG_FILE).exists():
        return "diffusers"
    if (path / OFFICIAL_ARGS_FILE).exists() or list(path.glob("consolidated*")):
        return "official"
    raise CheckpointError(f"{path}: no Next-DiT checkpoint found (expected {CONFIG_FILE}, {OFFICIAL_ARGS_FILE} "
                          "or consolidated.* weights)")


def _official_weights_file(folder: Path, ema: bool) -> Path:
    stem = OFFICIAL_EMA_WEIGHTS if ema else OFFICIAL_WEIGHTS
    for suffix in (".safetensors", ".pth"):
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.pth")


class Checkpoint(NamedTuple):
    """What a checkpoint holds, in the official layout whatever its format."""

    config: NextDiTConfig
    state: dict[str, torch.Tensor]
    metadata: dict  # our folder's entries beyond the model (text encoder / VAE references, …); {} for other formats


def read_checkpoint(path: str | os.PathLike, ema: bool = False, tensors: bool = True) -> Checkpoint:
    """Any supported checkpoint, local or s3://. ``ema``: the EMA weights instead of the raw ones.

    ``tensors=False`` reads no weights: the state dict is empty for our and diffusers' folders (config.json describes
    the model) and holds unread tensors of the stored shapes for an official checkpoint (its shapes are its config)."""
    with fetched(str(path), tensors) as local:
        return _read_local(Path(local), ema, tensors)


@contextmanager
def fetched(path: str, tensors: bool = True) -> Iterator[str]:
    """A local path holding the checkpoint at ``path`` for the block: ``path`` itself when local. Of a remote one,
    ``tensors=False`` fetches only what describes the model: the JSON files of our or diffusers' folder (an official
    checkpoint's shapes are its config: fetched whole); a consolidated file comes with the model_args.pth beside it.
    A Hub id gives its snapshot in the Hugging Face cache."""
    path = resolve_hub(path)
    if not is_remote(path):
        yield path
        return
    fs, remote = filesystem(path)
    if not fs.exists(remote):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if fs.isfile(remote):
        folder, name = path.rstrip("/").rsplit("/", 1)
        with local_copy(folder, include=lambda rel: rel in (name, OFFICIAL_ARGS_FILE)) as local:
            yield os.path.join(local, name)
        return
    root = remote.rstrip("/")
    described = fs.exists(f"{root}/{CONFIG_FILE}") or fs.exists(f"{root}/transformer/{CONFIG_FILE}")
    with local_copy(path, include=(lambda rel: rel.endswith(".json")) if described and not tensors else None) as local:
        yield local


def _read_local(path: Path, ema: bool, tensors: bool) -> Checkpoint:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = detect_format(path)
    if kind == "ours":
        data = json.loads((path / CONFIG_FILE).read_text())
        cfg = from_dict(NextDiTConfig, data["model"])
        extra = {k: v for k, v in data.items() if k not in ("format", "model")}
        if not tensors:
            return Checkpoint(cfg, {}, extra)
        weights = path / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE)
        if not weights.exists():
            raise CheckpointError(f"{path}: missing {weights.name}")
        return Checkpoint(cfg, load_file(str(weights)), extra)
    if kind == "diffusers":
        folder = path / "transformer" if (path / "transformer" / CONFIG_FILE).exists() else path
        cfg = config_from_diffusers(json.loads((folder / CONFIG_FILE).read_text()))
        if not tensors:
            return Checkpoint(cfg, {}, {})
        weights = folder / DIFFUSERS_WEIGHTS
        if not weights.exists():
            raise CheckpointError(f"{folder}: missing {DIFFUSERS_WEIGHTS}")
        return Checkpoint(cfg, diffusers_to_official(load_file(str(weights))), {})
    # official: a folder, or the consolidated file itself with model_args.pth beside it
    if path.is_file():
        weights, folder = path, path.parent
    else:
        weights, folder = _official_weights_file(path, ema), path
    state = _load_tensors(weights, shapes_only=not tensors)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    cfg = config_from_official(state, _load_official_args(folder / OFFICIAL_ARGS_FILE))
    return Checkpoint(cfg, state, {})


def read_config(path: str) -> NextDiTConfig:
    """The architecture of any supported checkpoint, local or s3://, without reading its weights."""
    return read_checkpoint(path, tensors=False).config


def _our_config(path: str) -> dict:
    """The config.json of our model folder at ``path`` (local, s3:// or a Hub id; nothing else fetched); {} for other
    formats."""
    fs, remote = filesystem(resolve_hub(path))
    config = remote.rstrip("/") + "/" + CONFIG_FILE
    if not fs.exists(config):
        return {}
    with fs.open(config, "r") as f:
        data = json.load(f)
    return data if data.get("format") == OUR_FORMAT else {}


def read_metadata(path: str) -> dict:
    """The extra entries (text encoder / VAE references, …) of our model folder's config.json; {} for other formats."""
    return {k: v for k, v in _our_config(path).items() if k not in ("format", "model")}


def read_modality(path: str) -> str:
    """What the model at ``path`` generates (``NextDiTConfig.modality``), from our config.json alone; official and
    diffusers checkpoints are image models."""
    return (_our_config(path).get("model") or {}).get("modality", "image")


def has_ema(path: str | os.PathLike) -> bool:
    """Whether the local checkpoint at ``path`` carries EMA weights."""
    path = Path(path)
    if path.is_file():
        return False
    return (path / EMA_WEIGHTS_FILE).exists() or bool(list(path.glob(f"{OFFICIAL_EMA_WEIGHTS}.*")))


# ---------------------------------------------------------------------------------------------------------------------
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(cfg: NextDiTConfig, state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str = "ours",
                     ema_state: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> None:
    """Write an official-layout state dict in one of the formats, to a local folder or s3://. ``metadata`` (text
    encoder / VAE references, …) is kept in our format only."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    state = _contiguous(state)
    with staged_output(str(path)) as local:
        folder = Path(local)
        if fmt == "ours":
            save_file(state, str(folder / WEIGHTS_FILE))
            if ema_state is not None:
                save_file(_contiguous(ema_state), str(folder / EMA_WEIGHTS_FILE))
            config = {"format": OUR_FORMAT, "model": to_dict(cfg), **(metadata or {})}
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        elif fmt == "official":
            save_file(state, str(folder / f"{OFFICIAL_WEIGHTS}.safetensors"))
            if ema_state is not None:
                save_file(_contiguous(ema_state), str(folder / f"{OFFICIAL_EMA_WEIGHTS}.safetensors"))
            torch.save(official_args(cfg), str(folder / OFFICIAL_ARGS_FILE))
        else:
            config = config_to_diffusers(cfg)
            save_file(official_to_diffusers(state), str(folder / DIFFUSERS_WEIGHTS))
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
