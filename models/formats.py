"""State-dict adapters: the official Lumina-Next and the diffusers ``LuminaNextDiT2DModel`` layouts ↔ ours.

Pure functions of tensors and configs (no files; ``models/checkpoint.py`` reads and writes them). Our module names are
the official ones, so the official layout needs no key mapping; the diffusers layout maps through ``_TOP_LEVEL`` and
``_PER_LAYER``, which duplicate ``wq`` and ``q_norm`` into attn1 and attn2 (docs/design-decisions.md#checkpoint-formats).
What tensor shapes cannot tell (the patch size, the training resolution) comes from the official ``model_args.pth`` or
the diffusers config.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from models import geometry
from models.config_io import from_dict, to_dict
from models.presets import NextDiTConfig

DIFFUSERS_CLASS = "LuminaNextDiT2DModel"


class CheckpointError(ValueError):
    """A checkpoint is malformed or does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------------------------
# diffusers ↔ official key mapping (docs/official-formats.md#diffusers-key-mapping): each official key maps
# to one or more diffusers keys.
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
    if cfg.modality != "image" or cfg.conditioning != "text" or cfg.rope_axes[0]:
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
        train_grid=(1, *geometry.token_grid(image_size, image_size, patch)),
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
        image_size=geometry.image_size(cfg.train_grid[1], cfg.train_grid[1], cfg.patch_size)[0],
        lumina_ray_config=to_dict(cfg),
    )
