"""Checkpoint formats: our model folder, the official Lumina-Next release, diffusers ``LuminaNextDiT2DModel``.

lumina-reference §8. Our module names are the official ones, so the official layout needs no key mapping; the diffusers
layout maps through ``DIFFUSERS_KEYS`` (which duplicates ``wq`` and ``q_norm`` into attn1 and attn2).

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
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.config_io import from_dict, to_dict
from models.nextdit import NextDiT
from models.presets import NextDiTConfig
from models.rope import NDRotaryEmbedding
from models.storage import filesystem, is_remote

log = logging.getLogger(__name__)

OUR_FORMAT = "lumina-ray/nextdit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
OFFICIAL_ARGS_FILE = "model_args.pth"
OFFICIAL_WEIGHTS = "consolidated.00-of-01"
OFFICIAL_EMA_WEIGHTS = "consolidated_ema.00-of-01"
DIFFUSERS_CLASS = "LuminaNextDiT2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PIXELS_PER_TOKEN = 16  # VAE ×8 and patch 2: the official image_size ↔ token-grid relation
FORMATS = ("ours", "official", "diffusers")


class CheckpointError(ValueError):
    """A checkpoint is malformed or does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------------------------
# diffusers ↔ official key mapping (lumina-reference §8.2). Each official key maps to one or more diffusers keys.
_TOP_LEVEL = {
    "x_embedder": ["patch_embedder.proj"],
    "pad_token": ["pad_token"],
    "t_embedder.mlp.0": ["time_caption_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_caption_embed.timestep_embedder.linear_2"],
    "cap_embedder.0": ["time_caption_embed.caption_embedder.0"],
    "cap_embedder.1": ["time_caption_embed.caption_embedder.1"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear_1"],
    "final_layer.linear": ["norm_out.linear_2"],
}
_PER_LAYER = {
    "attention.gate": ["gate"],
    "adaLN_modulation.1": ["norm1.linear"],
    "attention_norm1": ["norm1.norm"],
    "attention.wq": ["attn1.to_q", "attn2.to_q"],
    "attention.wk": ["attn1.to_k"],
    "attention.wv": ["attn1.to_v"],
    "attention.wk_y": ["attn2.to_k"],
    "attention.wv_y": ["attn2.to_v"],
    "attention.wo": ["attn2.to_out.0"],
    "attention.q_norm": ["attn1.norm_q", "attn2.norm_q"],
    "attention.k_norm": ["attn1.norm_k"],
    "attention.ky_norm": ["attn2.norm_k"],
    "attention_norm2": ["norm2"],
    "attention_y_norm": ["norm1_context"],
    "feed_forward.w1": ["feed_forward.linear_1"],
    "feed_forward.w2": ["feed_forward.linear_2"],
    "feed_forward.w3": ["feed_forward.linear_3"],
    "ffn_norm1": ["ffn_norm1"],
    "ffn_norm2": ["ffn_norm2"],
}


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' → ('a.b', 'weight'); bare parameters ('pad_token', 'attention.gate') have an empty suffix."""
    if key.endswith((".weight", ".bias")):
        module, _, suffix = key.rpartition(".")
        return module, suffix
    return key, ""


def _join(module: str, suffix: str) -> str:
    return f"{module}.{suffix}" if suffix else module


def official_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        module, suffix = _split(key)
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
        if match:
            targets = [f"layers.{match[1]}.{name}" for name in _PER_LAYER.get(match[2], [])]
        else:
            targets = _TOP_LEVEL.get(module, [])
        if not targets:
            raise CheckpointError(f"no diffusers name for key {key!r} (class-conditional models have no diffusers form)")
        for i, target in enumerate(targets):  # duplicates are real copies: safetensors refuses shared storage
            out[_join(target, suffix)] = tensor if i == 0 else tensor.clone()
    return out


def diffusers_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reverse: dict[str, str] = {}
    for official, names in _TOP_LEVEL.items():
        for name in names:
            reverse[name] = official
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        module, suffix = _split(key)
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
        official = None
        if match:
            for name, targets in _PER_LAYER.items():
                if match[2] in targets:
                    official = f"layers.{match[1]}.{name}"
        else:
            official = reverse.get(module)
        if official is None:
            unexpected.append(key)
            continue
        target = _join(official, suffix)
        if target in out and not torch.equal(out[target], tensor):
            raise CheckpointError(
                f"diffusers keys for {target!r} differ (attn1 and attn2 must share to_q / norm_q, as in Lumina-Next); "
                "this checkpoint cannot be represented by Next-DiT"
            )
        out[target] = tensor
    if unexpected:
        raise CheckpointError(f"unexpected keys in diffusers checkpoint: {', '.join(sorted(unexpected)[:20])}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
def config_to_diffusers(cfg: NextDiTConfig) -> dict[str, Any]:
    if cfg.conditioning != "text" or cfg.rope_axes_dims not in (None, cfg.rope_axes) or cfg.rope_axes[0]:
        raise CheckpointError("only text-conditioned 2D Next-DiT models have a diffusers LuminaNextDiT2DModel form")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.42.1",
        "sample_size": cfg.train_grid[1] * cfg.patch_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "hidden_size": cfg.dim,
        "num_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_kv_heads": cfg.kv_heads,
        "multiple_of": cfg.multiple_of,
        "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
        "norm_eps": cfg.norm_eps,
        "learn_sigma": cfg.learn_sigma,
        "qk_norm": cfg.qk_norm,
        "cross_attention_dim": cfg.cap_feat_dim,
        "scaling_factor": 1.0,
    }


def config_from_diffusers(data: dict[str, Any]) -> NextDiTConfig:
    side = int(data.get("sample_size", 128)) // int(data.get("patch_size", 2))
    return NextDiTConfig(
        patch_size=int(data.get("patch_size", 2)),
        in_channels=int(data.get("in_channels", 4)),
        dim=int(data.get("hidden_size", 2304)),
        n_layers=int(data.get("num_layers", 32)),
        n_heads=int(data.get("num_attention_heads", 32)),
        n_kv_heads=data.get("num_kv_heads"),
        multiple_of=int(data.get("multiple_of", 256)),
        ffn_dim_multiplier=data.get("ffn_dim_multiplier"),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        learn_sigma=bool(data.get("learn_sigma", True)),
        qk_norm=bool(data.get("qk_norm", True)),
        cap_feat_dim=int(data.get("cross_attention_dim", 2048)),
        train_grid=(1, side, side),
    )


_OFFICIAL_NAME = re.compile(r"NextDiT_(?P<size>\w+?)(?P<gqa>_GQA)?_patch(?P<patch>\d+)")


def config_from_official(state: dict[str, torch.Tensor], args: argparse.Namespace | dict | None) -> NextDiTConfig:
    """Infer the architecture from tensor shapes, with ``model_args.pth`` for what shapes cannot tell."""
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if isinstance(args.get("lumina_ray_config"), dict):  # written by us: exact
        return from_dict(NextDiTConfig, args["lumina_ray_config"])
    required = ["x_embedder.weight", "layers.0.attention.gate", "layers.0.attention.wk.weight",
                "layers.0.attention.wk_y.weight", "final_layer.linear.weight", "layers.0.feed_forward.w1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"not an official Lumina-Next T2I checkpoint: missing keys {', '.join(missing)}")
    name = _OFFICIAL_NAME.search(str(args.get("model", "")))
    patch = int(name["patch"]) if name else 2
    dim, in_feats = state["x_embedder.weight"].shape
    n_heads = state["layers.0.attention.gate"].shape[0]
    head_dim = dim // n_heads
    n_layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    in_channels = in_feats // (patch * patch)
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    image_size = int(args.get("image_size", 1024))
    base = dict(
        patch_size=patch, in_channels=in_channels, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=state["layers.0.attention.wk.weight"].shape[0] // head_dim,
        qk_norm="layers.0.attention.q_norm.weight" in state,
        learn_sigma=out_channels == 2 * in_channels,
        cap_feat_dim=state["layers.0.attention.wk_y.weight"].shape[1],
        train_grid=(1, image_size // PIXELS_PER_TOKEN, image_size // PIXELS_PER_TOKEN),
    )
    for multiple_of in (256, 128, 64, 32, 16, 8, 1):
        cfg = NextDiTConfig(**base, multiple_of=multiple_of)
        if cfg.ffn_hidden_dim == hidden:
            return cfg
    raise CheckpointError(f"cannot infer the feed-forward rounding for hidden width {hidden} (dim {dim})")


def official_args(cfg: NextDiTConfig) -> argparse.Namespace:
    size = {2304: "2B"}.get(cfg.dim, f"{cfg.dim}d")
    gqa = "_GQA" if cfg.kv_heads != cfg.n_heads else ""
    return argparse.Namespace(
        model=f"NextDiT_{size}{gqa}_patch{cfg.patch_size}",
        qk_norm=cfg.qk_norm,
        image_size=cfg.train_grid[1] * PIXELS_PER_TOKEN,
        lumina_ray_config=to_dict(cfg),
    )


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


def read_checkpoint(path: str | os.PathLike, ema: bool = False,
                    tensors: bool = True) -> tuple[NextDiTConfig, dict[str, torch.Tensor], dict]:
    """(config, official-layout state dict, extra metadata) of any supported checkpoint at a local path.

    ``tensors=False`` reads no weights: the state dict is empty for our and diffusers' folders (config.json describes
    the model) and holds unread tensors of the stored shapes for an official checkpoint (its shapes are its config)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = detect_format(path)
    if kind == "ours":
        data = json.loads((path / CONFIG_FILE).read_text())
        cfg = from_dict(NextDiTConfig, data["model"])
        extra = {k: v for k, v in data.items() if k not in ("format", "model")}
        if not tensors:
            return cfg, {}, extra
        weights = path / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE)
        if not weights.exists():
            raise CheckpointError(f"{path}: missing {weights.name}")
        return cfg, load_file(str(weights)), extra
    if kind == "diffusers":
        folder = path / "transformer" if (path / "transformer" / CONFIG_FILE).exists() else path
        cfg = config_from_diffusers(json.loads((folder / CONFIG_FILE).read_text()))
        if not tensors:
            return cfg, {}, {}
        weights = folder / DIFFUSERS_WEIGHTS
        if not weights.exists():
            raise CheckpointError(f"{folder}: missing {DIFFUSERS_WEIGHTS}")
        return cfg, diffusers_to_official(load_file(str(weights))), {}
    # official: a folder, or the consolidated file itself with model_args.pth beside it
    if path.is_file():
        weights, folder = path, path.parent
    else:
        weights, folder = _official_weights_file(path, ema), path
    state = _load_tensors(weights, shapes_only=not tensors)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    cfg = config_from_official(state, _load_official_args(folder / OFFICIAL_ARGS_FILE))
    return cfg, state, {}


def read_config(path: str) -> NextDiTConfig:
    """The architecture of any supported checkpoint, local or s3://, without reading its weights (a remote folder of
    ours or diffusers' gives only its JSON files; a remote official checkpoint is copied whole first)."""
    local, tmp = _localise(path, tensors=False)
    try:
        return read_checkpoint(local, tensors=False)[0]
    finally:
        if tmp is not None:
            tmp.cleanup()


def build_model(cfg: NextDiTConfig, state: dict[str, torch.Tensor], device="cpu", dtype=None) -> NextDiT:
    """A model with exactly these weights; missing, unexpected or mis-shaped keys raise a :class:`CheckpointError`."""
    with torch.device("meta"):
        model = NextDiT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}{' …' if len(unexpected) > 20 else ''}")
        if mismatched:
            parts.append(f"shape mismatches: {', '.join(mismatched[:10])}")
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(parts))
    model.load_state_dict({k: v.to(dtype) if dtype else v for k, v in state.items()}, strict=True, assign=True)
    # Non-persistent buffers (RoPE pair layout) are not in the state dict: rebuild them off the meta device.
    model.rope = NDRotaryEmbedding.for_model(cfg)
    return model.to(device)


def _localise(path: str, tensors: bool = True) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """Copy a remote (s3://…) checkpoint to a temporary local folder; ``tensors=False``: only the JSON files of a
    folder that has a config.json (what ``read_checkpoint(..., tensors=False)`` reads)."""
    if not is_remote(str(path)):
        return str(path), None
    fs, remote = filesystem(str(path))
    tmp = tempfile.TemporaryDirectory(prefix="nextdit-")
    if fs.isdir(remote):
        root = remote.rstrip("/")
        files = fs.find(root)
        if not tensors and any(f.endswith(f"/{CONFIG_FILE}") for f in files):
            for f in (f for f in files if f.endswith(".json")):
                local = os.path.join(tmp.name, os.path.relpath(f, root))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get(f, local)
            return tmp.name, tmp
        fs.get(root + "/", tmp.name, recursive=True)
        return tmp.name, tmp
    local = os.path.join(tmp.name, os.path.basename(remote))
    fs.get(remote, local)
    parent_args = remote.rsplit("/", 1)[0] + "/" + OFFICIAL_ARGS_FILE
    if fs.exists(parent_args):
        fs.get(parent_args, os.path.join(tmp.name, OFFICIAL_ARGS_FILE))
    return local, tmp


def load_model(path: str, ema: bool = False, device="cpu", dtype: torch.dtype | None = None) -> NextDiT:
    """Load our folder, an official consolidated checkpoint or a diffusers folder (local or s3://)."""
    local, tmp = _localise(path)
    try:
        cfg, state, extra = read_checkpoint(local, ema=ema)
    finally:
        if tmp is not None:
            tmp.cleanup()
    model = build_model(cfg, state, device, dtype)
    model.checkpoint_metadata = extra
    return model


def read_metadata(path: str) -> dict:
    """The extra entries (text encoder / VAE references, …) of our model folder's config.json; {} for other formats."""
    fs, remote = filesystem(str(path))
    config = remote.rstrip("/") + "/" + CONFIG_FILE
    if not fs.exists(config):
        return {}
    with fs.open(config, "r") as f:
        data = json.load(f)
    if data.get("format") != OUR_FORMAT:
        return {}
    return {k: v for k, v in data.items() if k not in ("format", "model")}


# ---------------------------------------------------------------------------------------------------------------------
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(cfg: NextDiTConfig, state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str = "ours",
                     ema_state: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> None:
    """Write an official-layout state dict in one of the formats (local folder)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = _contiguous(state)
    if fmt == "ours":
        save_file(state, str(path / WEIGHTS_FILE))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(path / EMA_WEIGHTS_FILE))
        config = {"format": OUR_FORMAT, "model": to_dict(cfg), **(metadata or {})}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    elif fmt == "official":
        save_file(state, str(path / f"{OFFICIAL_WEIGHTS}.safetensors"))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(path / f"{OFFICIAL_EMA_WEIGHTS}.safetensors"))
        torch.save(official_args(cfg), str(path / OFFICIAL_ARGS_FILE))
    else:
        config = config_to_diffusers(cfg)
        save_file(official_to_diffusers(state), str(path / DIFFUSERS_WEIGHTS))
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def save_model(model: NextDiT, path: str, fmt: str = "ours", ema_state: dict | None = None,
               metadata: dict | None = None) -> None:
    """Save a model (local path or s3://)."""
    if not is_remote(str(path)):
        write_checkpoint(model.config, model.state_dict(), path, fmt, ema_state, metadata)
        return
    with tempfile.TemporaryDirectory(prefix="nextdit-") as tmp:
        write_checkpoint(model.config, model.state_dict(), tmp, fmt, ema_state, metadata)
        fs, remote = filesystem(str(path))
        fs.put(tmp.rstrip("/") + "/", remote, recursive=True)


def _has_ema(local: str) -> bool:
    path = Path(local)
    if path.is_file():
        return False
    return (path / EMA_WEIGHTS_FILE).exists() or bool(list(path.glob(f"{OFFICIAL_EMA_WEIGHTS}.*")))


def convert_checkpoint(src: str, dst: str, fmt: str) -> NextDiTConfig:
    """Rewrite any supported checkpoint (local or s3://) in format ``fmt`` at ``dst``; EMA weights travel along
    (diffusers has no slot for them). Our folder's metadata (text encoder / VAE references) is kept when writing ours."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    local, tmp = _localise(src)
    try:
        cfg, state, extra = read_checkpoint(local)
        ema_state = read_checkpoint(local, ema=True)[1] if _has_ema(local) and fmt != "diffusers" else None
    finally:
        if tmp is not None:
            tmp.cleanup()
    build_model(cfg, state, device="meta")  # validates keys and shapes before anything is written
    if not is_remote(dst):
        write_checkpoint(cfg, state, dst, fmt, ema_state, extra)
        return cfg
    with tempfile.TemporaryDirectory(prefix="nextdit-") as out:
        write_checkpoint(cfg, state, out, fmt, ema_state, extra)
        fs, remote = filesystem(dst)
        fs.put(out.rstrip("/") + "/", remote, recursive=True)
    return cfg
