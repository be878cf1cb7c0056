"""Next-DiT configuration and the registry of size presets (lumina-reference §1.5).

The defaults reproduce the official Lumina-Next T2I model: patch 2, 4 latent channels, learn_sigma, QK-norm, RoPE θ 10⁴,
proportional attention with a 4096-token base (1024-px training: 64×64 tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.config_io import ConfigError, from_dict

CONDITIONINGS = ("text", "class")


@dataclass
class NextDiTConfig:
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 2304
    n_layers: int = 24
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as query heads (MHA)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    learn_sigma: bool = True
    # "text": pooled caption + gated cross-attention (T2I); "class": label embedding with a null class (ImageNet).
    conditioning: str = "text"
    cap_feat_dim: int = 2048
    num_classes: int = 1000
    rope_theta: float = 10000.0
    # Real channels of each RoPE axis (frames, height, width); None: (0, head_dim/2, head_dim/2), the official 2D RoPE.
    rope_axes_dims: tuple[int, int, int] | None = None
    # Tokens per axis (frames, height, width) at the training resolution: where RoPE scaling starts, and the
    # proportional-attention base N_base = their product (1024 px / 16 px per token = 64).
    train_grid: tuple[int, int, int] = (1, 64, 64)
    proportional_attn: bool = True
    attention_backend: str = "auto"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"unknown conditioning {self.conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        axes = self.rope_axes
        if sum(axes) != self.head_dim or any(d % 2 for d in axes):
            raise ConfigError(f"rope_axes_dims {axes} must be even and sum to the head dim {self.head_dim}")
        if self.rope_axes_dims is None and self.head_dim % 4:
            raise ConfigError(f"2D RoPE needs a head dim divisible by 4, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def cond_dim(self) -> int:
        """Width of the adaLN conditioning vector: min(dim, 1024) (lumina-reference §1.1)."""
        return min(self.dim, 1024)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        if self.rope_axes_dims is not None:
            return tuple(self.rope_axes_dims)
        return (0, self.head_dim // 2, self.head_dim // 2)

    @property
    def base_tokens(self) -> int:
        """N_base of proportional attention (4096 for 1024-px training)."""
        n = 1
        for size in self.train_grid:
            n *= size
        return n

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: int(2·4·dim/3), times the multiplier, rounded up to multiple_of (lumina-reference §1.4)."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "NextDiTConfig":
        return dataclasses.replace(self, **changes)


_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, cap_feat_dim=32, train_grid=(1, 8, 8))

# One registry of every preset; CLIs validate --preset against its keys.
PRESETS: dict[str, dict] = {
    # Lumina-Next T2I (Gemma-2B captions). The released checkpoints are the GQA variant (lumina-reference §1.5).
    "2B": dict(dim=2304, n_layers=24, n_heads=32, n_kv_heads=None, cap_feat_dim=2048),
    "2B-GQA": dict(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, cap_feat_dim=2048),
    # Next-DiT ImageNet 256 px (class-conditional, 1000 classes + null): 16×16 tokens at training size.
    "imagenet-600M": dict(dim=1536, n_layers=16, n_heads=32, conditioning="class", train_grid=(1, 16, 16)),
    "imagenet-2B": dict(dim=2304, n_layers=24, n_heads=32, conditioning="class", train_grid=(1, 16, 16)),
    "imagenet-3B": dict(dim=3072, n_layers=32, n_heads=32, conditioning="class", train_grid=(1, 16, 16)),
    "imagenet-7B": dict(dim=4096, n_layers=32, n_heads=32, conditioning="class", train_grid=(1, 16, 16)),
    # CPU-sized presets for tests, CI and the demo (128-px images → 16² latents → 8×8 tokens at training size).
    "tiny": dict(_TINY),
    "tiny-class": dict(_TINY, conditioning="class", num_classes=10),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, cap_feat_dim=64, train_grid=(1, 16, 16)),
}


def preset(name: str, **overrides) -> NextDiTConfig:
    """The config of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return from_dict(NextDiTConfig, {**PRESETS[name], **overrides})
