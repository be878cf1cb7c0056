"""Next-DiT configuration and the registry of size presets (docs/official-formats.md#size-configs).

The defaults reproduce the official Lumina-Next T2I model: patch 2, 4 latent channels, learn_sigma, QK-norm, RoPE θ 10⁴,
proportional attention with a 4096-token base (1024-px training: 64×64 tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.config_io import ConfigError, from_dict

CONDITIONINGS = ("text", "class")
# What the latents decode to. Image latents are (C, H, W); audio latents are (C, 1, T) — one row of latent frames, so
# the same blocks run 1D RoPE on the time axis (rope_axes_dims (0, 0, head_dim)) — or a VAE's (C, F, T) mel latents;
# point clouds are (3, 1, N), N points as tokens with no RoPE at all (models/points.py).
MODALITIES = ("image", "audio", "points")
# The official recipe's aspect-ratio limit of its training crops (docs/sampling.md, "Resolution extrapolation"): buckets up to 4:1
# within the token budget. pipelines' bucket config takes its default from here.
OFFICIAL_MAX_ASPECT = 4.0


def longest_side(area: int, max_aspect: float = OFFICIAL_MAX_ASPECT) -> int:
    """Tokens on the long side of the longest bucket w×h with w·h ≤ ``area`` and w/h ≤ ``max_aspect`` (the official
    bucket rule): 128 for 4096 tokens at 4:1 (a 2048×512 image), 16 for 64."""
    best = 1
    for w in range(1, area + 1):
        h = area // w
        if h >= 1 and w / h <= max_aspect:
            best = w
    return best


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
    modality: str = "image"  # one of MODALITIES
    # points: Fourier features of the coordinates (models/points.py), this many frequencies from 1 to the maximum
    fourier_features: int = 16
    fourier_max_freq: float = 32.0
    cap_feat_dim: int = 2048
    num_classes: int = 1000
    rope_theta: float = 10000.0
    # Real channels of each RoPE axis (frames, height, width); None: (0, head_dim/2, head_dim/2), the official 2D RoPE.
    rope_axes_dims: tuple[int, int, int] | None = None
    # Tokens per axis (frames, height, width) at the square training resolution: the default sampling size and the
    # proportional-attention base N_base = their product (1024 px / 16 px per token = 64).
    train_grid: tuple[int, int, int] = (1, 64, 64)
    # What the model was trained on — where RoPE scaling starts (docs/sampling.md, "Resolution extrapolation"): the
    # largest spatial token area of its training buckets, and the most tokens it saw on each axis (frames, height,
    # width). None: the official recipe's, i.e. the area of train_grid and the long side of a 4:1 bucket within it
    # (4096 tokens and 128 tokens per axis for 1024-px training). jobs.export records the run's buckets here.
    trained_area: int | None = None
    trained_sides: tuple[int, int, int] | None = None
    # Proportional attention at sampling (the official sampling call sets it; training has its own switch, off by
    # default as in the official recipe: train.proportional_attn).
    proportional_attn: bool = True
    attention_backend: str = "auto"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"unknown conditioning {self.conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        if self.modality not in MODALITIES:
            raise ConfigError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        if self.modality == "audio" and self.conditioning != "text":
            raise ConfigError("an audio model is text-conditioned (conditioning: text)")
        axes = self.rope_axes
        if self.modality == "points":
            if (self.in_channels, self.patch_size, self.learn_sigma) != (3, 1, False) or any(axes):
                raise ConfigError("a points model takes (3, 1, N) clouds: in_channels 3, patch_size 1, learn_sigma "
                                  "false, and no RoPE (rope_axes_dims (0, 0, 0): a cloud is a set)")
            if self.fourier_features < 1 or self.fourier_max_freq < 1:
                raise ConfigError("fourier_features and fourier_max_freq must be ≥ 1")
        elif sum(axes) != self.head_dim or any(d % 2 for d in axes):
            raise ConfigError(f"rope_axes_dims {axes} must be even and sum to the head dim {self.head_dim}")
        if self.rope_axes_dims is None and self.head_dim % 4:
            raise ConfigError(f"2D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.trained_area is not None and self.trained_area < 1:
            raise ConfigError(f"trained_area must be ≥ 1 token, got {self.trained_area}")
        if self.trained_sides is not None and any(n < 1 for n in self.trained_sides):
            raise ConfigError(f"trained_sides must be ≥ 1 token per axis, got {self.trained_sides}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def cond_dim(self) -> int:
        """Width of the adaLN conditioning vector: min(dim, 1024) (docs/official-formats.md#architecture-constants)."""
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
    def rope_area(self) -> int:
        """Spatial token area (height × width) beyond which the area policy scales RoPE."""
        return self.trained_area or self.train_grid[1] * self.train_grid[2]

    @property
    def rope_sides(self) -> tuple[int, int, int]:
        """Tokens per axis (frames, height, width) beyond which the per-axis policy scales RoPE."""
        if self.trained_sides is not None:
            return tuple(self.trained_sides)
        side = longest_side(self.rope_area)
        return (self.train_grid[0], side, side)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: int(2·4·dim/3), times the multiplier, rounded up to multiple_of
        (docs/official-formats.md#architecture-constants)."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def trained_on(self, grids=(), *configs: "NextDiTConfig") -> "NextDiTConfig":
        """This config recording that it was trained on token ``grids`` (frames, height, width) and on whatever the
        ``configs`` were trained on (e.g. the pretrained model a run fine-tunes): the largest area, longest sides."""
        areas = [g[1] * g[2] for g in grids] + [c.rope_area for c in configs]
        sides = [tuple(g) for g in grids] + [c.rope_sides for c in configs]
        if not areas:
            raise ValueError("trained_on needs at least one grid or config")
        return self.replace(trained_area=max(areas), trained_sides=tuple(max(s[a] for s in sides) for a in range(3)))

    def replace(self, **changes) -> "NextDiTConfig":
        return dataclasses.replace(self, **changes)


_IMAGENET = dict(conditioning="class", train_grid=(1, 16, 16), trained_sides=(1, 16, 16))
# Audio (paper §5.2): tokens are the latent frames of the mel VAE (20 channels, one token per frame: patch 1 over a
# (20, 1, T) latent), 1D RoPE on the time axis, no learned variance. The area rule of RoPE scaling has no meaning for
# one row of frames, so the training length is recorded per axis.
_AUDIO = dict(modality="audio", in_channels=20, patch_size=1, learn_sigma=False)
_AUDIO_2D = dict(_AUDIO, in_channels=8)  # AudioLDM's mel VAE: (8, 16, T) latents, one token per latent pixel
# Point clouds (paper §5.3): 3 coordinates × one row of N points, one token per point, no RoPE; trained on 256 points
# (the paper's density), recorded per axis like audio so that sampling at N points knows its density ratio.
_POINTS = dict(modality="points", in_channels=3, patch_size=1, learn_sigma=False, rope_axes_dims=(0, 0, 0),
               train_grid=(1, 1, 256), trained_sides=(1, 1, 256), trained_area=256)
_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, cap_feat_dim=32, train_grid=(1, 8, 8))

# One registry of every preset; CLIs validate --preset against its keys.
PRESETS: dict[str, dict] = {
    # Lumina-Next T2I (Gemma-2B captions). The released checkpoints are the GQA variant
    # (docs/official-formats.md#size-configs).
    "2B": dict(dim=2304, n_layers=24, n_heads=32, n_kv_heads=None, cap_feat_dim=2048),
    "2B-GQA": dict(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, cap_feat_dim=2048),
    # Next-DiT ImageNet 256 px (class-conditional, 1000 classes + null): square 256-px centre crops, 16×16 tokens.
    "imagenet-600M": dict(dim=1536, n_layers=16, n_heads=32, **_IMAGENET),
    "imagenet-2B": dict(dim=2304, n_layers=24, n_heads=32, **_IMAGENET),
    "imagenet-3B": dict(dim=3072, n_layers=32, n_heads=32, **_IMAGENET),
    "imagenet-7B": dict(dim=4096, n_layers=32, n_heads=32, **_IMAGENET),
    # CPU-sized presets for tests, CI and the demo (128-px images → 16² latents → 8×8 tokens at training size).
    "tiny": dict(_TINY),
    "tiny-class": dict(_TINY, conditioning="class", num_classes=10),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, cap_feat_dim=64, train_grid=(1, 16, 16)),
    # The width and depth of the official audio / music model (hidden 768, 16 blocks, 32 heads of 24, SwiGLU 2048,
    # 1024-wide T5 / CLAP captions; docs/official-formats.md#audio-and-music) as a Next-DiT, trained on 10-s clips:
    # 312 latent frames.
    "audio": dict(_AUDIO, dim=768, n_layers=16, n_heads=32, cap_feat_dim=1024, rope_axes_dims=(0, 0, 24),
                  train_grid=(1, 1, 312), trained_sides=(1, 1, 312), trained_area=312),
    "tiny-audio": dict(_TINY, **_AUDIO, rope_axes_dims=(0, 0, 16), train_grid=(1, 1, 32), trained_sides=(1, 1, 32),
                       trained_area=32),
    # The same on the 2D latents of AudioLDM's mel VAE (docs/design-decisions.md#audioldm-vae): 8 channels × 16
    # frequency rows × frames at 25 a second, 2D RoPE over frequency × time (half the channels each). audio-2d's 10 s
    # are 1001 mel frames → 251 latent frames.
    "audio-2d": dict(_AUDIO_2D, dim=768, n_layers=16, n_heads=32, cap_feat_dim=1024, rope_axes_dims=(0, 12, 12),
                     train_grid=(1, 16, 251), trained_sides=(1, 16, 251), trained_area=16 * 251),
    "tiny-audio-2d": dict(_TINY, **_AUDIO_2D, rope_axes_dims=(0, 8, 8), train_grid=(1, 16, 16),
                          trained_sides=(1, 16, 16), trained_area=256),
    # Point clouds (paper §5.3, docs/design-decisions.md#time-aware-scaled-fourier-features). The paper gives no size;
    # ours: the official audio model's width and depth with 64-wide heads, Gemma-2B captions (Cap3D) or ShapeNet's 55
    # classes (conditioning: class).
    "points": dict(_POINTS, dim=768, n_layers=16, n_heads=12, cap_feat_dim=2048, num_classes=55),
    "tiny-points": dict(_TINY, **_POINTS, num_classes=3),  # the demo's solids: sphere, cube, cylinder
}


def preset(name: str, **overrides) -> NextDiTConfig:
    """The config of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return from_dict(NextDiTConfig, {**PRESETS[name], **overrides})
