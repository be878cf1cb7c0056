"""N-D rotary position embedding (frames × height × width) with resolution-extrapolation scaling.

Lumina-Next (paper §2.1, §2.2; the official tables: docs/official-formats.md#rope; our modes and factors:
docs/design-decisions.md#rope-scaling-modes, docs/design-decisions.md#per-axis-extrapolation-factor):
- each axis owns ``d_axis`` real channels = d_axis/2 complex pairs with base frequencies ω_k = θ^(−2k/d_axis);
- pairs are interleaved round-robin over the axes that have channels (h, w, h, w, … for images, exactly the official
  layout), positions are integer token indices starting at 0;
- beyond what the model was trained on, the frequencies are scaled by a factor s with one of the modes below; at every
  shape it was trained at, every mode is the identity at every t. Training runs aspect-ratio buckets within a token
  budget (the official recipe: up to 4:1 within 4096 tokens, so 2048×512 is a trained shape), so "trained" is two
  numbers the model folder records (``NextDiTConfig.rope_area`` and ``rope_sides``):
  - ``per_axis`` (default): each axis on its own, s_axis = max(1, tokens_axis / most tokens trained on that axis);
  - ``area`` (the official rule): one s = max(1, sqrt(token area / trained token area)) on every spatial axis.

Modes (d = real channels of the axis, ω_k = θ^(−2k/d), k = 0 … d/2−1):
- ``none``: plain position extrapolation;
- ``pi``: position interpolation, ω_k / s;
- ``ntk``: NTK-aware base, θ·s^(d/(d−2));
- ``freq_aware``: k* = (d/2)·log_θ(L/2π) (L = training tokens on the axis), base θ' = θ·s^(d/(2k*)),
  ω'_k = max(ω_k/s, θ'^(−2k/d)) — dimension k* is exactly PI, lower k keep NTK detail;
- ``time_aware``: as ``freq_aware`` with k*(t) = (2d·t + 1)/4 growing with the flow time t (PI-dominated at t = 0 for
  global structure, NTK at t = 1 for detail), recomputed at every solver evaluation;
- ``official_switch``: the official main-branch rule, PI for t < 0.3 and base θ·s afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_MODES = ("none", "pi", "ntk", "freq_aware", "time_aware", "official_switch")
SCALE_POLICIES = ("per_axis", "area")
OFFICIAL_SWITCH_WATERSHED = 0.3  # the official demo's default time-aware watershed (docs/official-formats.md#rope)


@dataclass
class RopeScaling:
    """How RoPE frequencies change above the training size (inference-time; every field has the paper default)."""

    mode: str = "time_aware"
    # per_axis: s_axis = max(1, tokens_axis / most tokens trained on that axis) (ours,
    # docs/design-decisions.md#per-axis-extrapolation-factor); area: one
    # s = max(1, sqrt(token area / trained area)) on every spatial axis (the official rule, for official images).
    policy: str = "per_axis"
    # Explicit per-axis factors (frames, height, width) replace the computed ones when given.
    factors: tuple[float, ...] | None = None
    watershed: float = OFFICIAL_SWITCH_WATERSHED

    def __post_init__(self):
        if self.mode not in ROPE_MODES:
            raise ValueError(f"unknown RoPE scaling mode {self.mode!r}; choose one of {', '.join(ROPE_MODES)}")
        if self.policy not in SCALE_POLICIES:
            raise ValueError(f"unknown RoPE scale policy {self.policy!r}; choose one of {', '.join(SCALE_POLICIES)}")
        if self.factors is not None:
            self.factors = tuple(float(f) for f in self.factors)
            if any(f <= 0 for f in self.factors):
                raise ValueError(f"RoPE factors must be positive, got {self.factors}")


def axis_frequencies(dim: int, theta: float, scale: float = 1.0, mode: str = "none", t: float = 1.0,
                     trained_tokens: int = 128, watershed: float = OFFICIAL_SWITCH_WATERSHED) -> torch.Tensor:
    """Frequencies (d/2,) in fp64 of one axis with ``dim`` real channels, scaled by ``scale`` according to ``mode``."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    base = theta ** (-2.0 * k / dim)
    if mode == "none" or scale == 1.0:
        return base
    if mode == "pi":
        return base / scale
    if mode == "ntk":
        if dim <= 2:  # a single pair has no spectrum to redistribute: NTK degenerates to PI
            return base / scale
        return (theta * scale ** (dim / (dim - 2))) ** (-2.0 * k / dim)
    if mode == "official_switch":
        return base / scale if t < watershed else (theta * scale) ** (-2.0 * k / dim)
    if mode == "freq_aware":
        k_star = (dim / 2) * math.log(trained_tokens / (2 * math.pi), theta)
    elif mode == "time_aware":
        k_star = (2 * dim * float(t) + 1) / 4
    else:
        raise ValueError(f"unknown RoPE scaling mode {mode!r}")
    if k_star <= 0:  # no wavelength fits the training length: every dimension interpolates
        return base / scale
    ntk = base * scale ** (-k / k_star)  # = (θ·s^(d/(2k*)))^(−2k/d)
    return torch.maximum(base / scale, ntk)


def pair_axes(axes_dims: tuple[int, ...]) -> list[tuple[int, int]]:
    """(axis, frequency index) of every complex pair: round-robin over the axes that still have pairs left.

    For images, axes_dims = (0, hd/2, hd/2) gives h0, w0, h1, w1, … — the official interleaved layout.
    """
    remaining = [d // 2 for d in axes_dims]
    used = [0] * len(axes_dims)
    order = []
    while any(r > 0 for r in remaining):
        for axis in range(len(axes_dims)):
            if remaining[axis] > 0:
                order.append((axis, used[axis]))
                used[axis] += 1
                remaining[axis] -= 1
    return order


class NDRotaryEmbedding(torch.nn.Module):
    """Builds per-token rotation angles for grids of (frames, height, width) tokens; applies them to q and k.

    ``trained_sides``: the most tokens the model was trained on per axis; ``trained_area``: the largest spatial token
    area (height × width) it was trained on. Scaling starts beyond them (module docstring)."""

    def __init__(self, head_dim: int, axes_dims: tuple[int, ...], theta: float = 10000.0,
                 trained_sides: tuple[int, ...] = (1, 128, 128), trained_area: int = 4096):
        super().__init__()
        if sum(axes_dims) != head_dim:
            raise ValueError(f"RoPE axes dims {axes_dims} must sum to the head dim {head_dim}")
        if any(d % 2 for d in axes_dims):
            raise ValueError(f"RoPE axes dims must be even, got {axes_dims}")
        if len(trained_sides) != len(axes_dims):
            raise ValueError(f"trained_sides {trained_sides} needs one entry per RoPE axis {axes_dims}")
        self.head_dim = head_dim
        self.axes_dims = tuple(axes_dims)
        self.theta = float(theta)
        self.trained_sides = tuple(trained_sides)
        self.trained_area = int(trained_area)
        order = pair_axes(self.axes_dims)
        self.register_buffer("pair_axis", torch.tensor([a for a, _ in order], dtype=torch.long), persistent=False)
        self.register_buffer("pair_index", torch.tensor([k for _, k in order], dtype=torch.long), persistent=False)

    @classmethod
    def for_model(cls, cfg) -> NDRotaryEmbedding:
        """The RoPE of a ``NextDiTConfig``: its axes, θ, and what it was trained on."""
        return cls(cfg.head_dim, cfg.rope_axes, cfg.rope_theta, cfg.rope_sides, cfg.rope_area)

    def scale_factors(self, grid: tuple[int, ...], scaling: RopeScaling | None) -> tuple[float, ...]:
        """Per-axis extrapolation factors for a token grid (frames, height, width)."""
        if scaling is None or scaling.mode == "none":
            return (1.0,) * len(grid)
        if scaling.factors is not None:
            if len(scaling.factors) != len(grid):
                raise ValueError(f"RoPE factors {scaling.factors} need one entry per axis of the grid {grid}")
            return scaling.factors
        if scaling.policy == "area":  # official: one factor from the spatial area, only beyond the trained area
            s = max(1.0, math.sqrt(math.prod(grid[1:]) / self.trained_area))
            return (1.0,) + (s,) * (len(grid) - 1)
        return tuple(max(1.0, n / n_trained) for n, n_trained in zip(grid, self.trained_sides))

    def frequencies(self, grid: tuple[int, ...], t: float, scaling: RopeScaling | None) -> torch.Tensor:
        """Frequency (fp64) of every complex pair for this grid size and flow time. Shape (head_dim/2,)."""
        factors = self.scale_factors(grid, scaling)
        mode = "none" if scaling is None else scaling.mode
        watershed = OFFICIAL_SWITCH_WATERSHED if scaling is None else scaling.watershed
        per_axis = [
            axis_frequencies(d, self.theta, factors[a], mode, t, self.trained_sides[a], watershed) if d else None
            for a, d in enumerate(self.axes_dims)
        ]
        return torch.stack([per_axis[a][k] for a, k in zip(self.pair_axis.tolist(), self.pair_index.tolist())])

    def angles(self, grid: tuple[int, ...], t: float, scaling: RopeScaling | None,
               device: torch.device | None = None) -> torch.Tensor:
        """Rotation angles (N, head_dim/2) in fp32 for the N = prod(grid) tokens of one sample, row-major order."""
        freqs = self.frequencies(grid, t, scaling).to(device=device, dtype=torch.float32)
        coords = torch.stack(
            torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij"), dim=-1
        ).reshape(-1, len(grid))  # (N, n_axes)
        return coords[:, self.pair_axis.to(device)] * freqs  # (N, head_dim/2)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (2j, 2j+1) of x (B, N, H, D) by the unit complex ``rotation`` (B, N, D/2) of
    pair j: one complex multiply in fp32, as the official code does."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[:, :, None, :]).flatten(-2).to(x.dtype)
