"""Point clouds on Next-DiT (paper §5.3): points are tokens, embedded by Time-Aware Scaled Fourier Features.

A cloud of N points is the model input (3, 1, N): the coordinates as channels over one row of N tokens (patch 1), the
layout audio latents have, so list batches of different N, padding masks, flow matching and the solvers work unchanged.
A cloud is a *set*: there is no positional RoPE, and the model is permutation-equivariant (its velocity for a permuted
cloud is the permuted velocity). The coordinates carry the position, through Fourier features [Tancik et al.]:

    γ(p) = [p, sin(2π f_k p_j), cos(2π f_k p_j)]   j ∈ {x, y, z},  f_k = f_max^{k / (K − 1)},  k = 0 … K − 1

then one linear layer to the model width. K = ``NextDiTConfig.fourier_features`` frequencies, log-spaced from 1 to
``fourier_max_freq`` cycles per unit (clouds live in the unit sphere).

**Time-aware scaling** (the paper's formula is lost from its text; the derivation is in
docs/design-decisions.md#time-aware-scaled-fourier-features). A model trained on N₀ points sees, at N = s·N₀, the same shape sampled s times more
densely: the spacing between neighbours on the surface shrinks by √s, while the shape's extent does not change. So the
lowest frequency (the global shape) must stay and the highest ones see neighbours √s closer than in training. As the
NTK rule does for RoPE, each frequency is divided by a power of λ = √s that grows with its index, and, as the
time-aware RoPE does, the scaling fades over the flow time t (t = 0 noise, t = 1 data) — global features early, the
full detail of the denser cloud late:

    f_k'(t) = f_k · λ^{−(1 − t) · k / (K − 1)}

At s ≤ 1 (fewer points than trained) and at t = 1 nothing changes. ``RopeScaling`` modes select it: ``time_aware``
(the default), ``ntk`` (the same without the fade: t = 0 throughout) and ``none``; the other RoPE modes have no meaning
for a set and are refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

POINT_CHANNELS = 3  # x, y, z
POINT_SCALING_MODES = ("none", "ntk", "time_aware")
MAX_POINTS = 16_384  # default upper bound on a request's point count (SamplerConfig.max_points)


def check_points(count, max_points: int = MAX_POINTS) -> None:
    """A point count is a whole number from 1 to ``max_points``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"points {count!r} must be a whole number ≥ 1")
    if count > max_points:
        raise ValueError(f"{count} points exceeds the maximum of {max_points}")


def fourier_frequencies(count: int, max_freq: float) -> torch.Tensor:
    """(count,) float32 frequencies in cycles per unit, log-spaced from 1 to ``max_freq``."""
    if count < 1 or max_freq < 1:
        raise ValueError(f"need ≥ 1 Fourier frequency and max_freq ≥ 1, got {count} and {max_freq}")
    if count == 1:
        return torch.ones(1)
    return max_freq ** (torch.arange(count, dtype=torch.float64) / (count - 1)).float()


def scaled_frequencies(freqs: torch.Tensor, points: int, trained_points: int, t: torch.Tensor,
                       mode: str = "time_aware") -> torch.Tensor:
    """(B, K) frequencies for clouds of ``points`` points at flow times ``t`` (B,), a model trained on
    ``trained_points``: f_k · λ^{−(1 − t)·k/(K − 1)} with λ = √(points / trained_points) (module docstring)."""
    if mode not in POINT_SCALING_MODES:
        raise ValueError(f"point clouds take the scaling modes {', '.join(POINT_SCALING_MODES)}; {mode!r} is a RoPE "
                         "rule for grids")
    batch = t.shape[0]
    ratio = points / trained_points
    if mode == "none" or ratio <= 1:
        return freqs.expand(batch, -1)
    count = freqs.shape[0]
    index = torch.arange(count, dtype=torch.float32, device=freqs.device) / max(count - 1, 1)
    fade = (1 - t.float().clamp(0, 1)) if mode == "time_aware" else torch.ones_like(t, dtype=torch.float32)
    exponent = fade[:, None].to(freqs.device) * index[None, :]  # (B, K)
    return freqs[None, :] * torch.exp(-exponent * math.log(math.sqrt(ratio)))


class PointEmbedder(nn.Module):
    """Coordinates (B, N, 3) → tokens (B, N, dim): [p, sin, cos] of the (time-aware scaled) Fourier features, then a
    linear layer. The frequency ladder is a fixed buffer (not a weight), rebuilt from the config."""

    def __init__(self, features: int, max_freq: float, trained_points: int, dim: int):
        super().__init__()
        self.trained_points = trained_points
        self.register_buffer("freqs", fourier_frequencies(features, max_freq), persistent=False)
        self.proj = nn.Linear(POINT_CHANNELS * (1 + 2 * features), dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, xyz: torch.Tensor, t: torch.Tensor, mode: str = "time_aware") -> torch.Tensor:
        batch, points, channels = xyz.shape
        if channels != POINT_CHANNELS:
            raise ValueError(f"points have {POINT_CHANNELS} coordinates, got {channels} (shape {tuple(xyz.shape)})")
        freqs = scaled_frequencies(self.freqs, points, self.trained_points, t, mode)  # (B, K)
        phase = 2 * math.pi * xyz.float()[..., None] * freqs[:, None, None, :]  # (B, N, 3, K)
        features = torch.cat([xyz.float(), phase.sin().flatten(2), phase.cos().flatten(2)], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype))


# ---- files ------------------------------------------------------------------------------------------------------------
def ply_bytes(points: np.ndarray) -> bytes:
    """An (N, 3) cloud as a binary little-endian PLY file of float32 vertices x, y, z (what trimesh, Open3D and
    MeshLab read)."""
    cloud = np.ascontiguousarray(points, dtype="<f4")
    if cloud.ndim != 2 or cloud.shape[1] != POINT_CHANNELS:
        raise ValueError(f"a cloud is (N, 3), got shape {cloud.shape}")
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {cloud.shape[0]}\n"
              "property float x\nproperty float y\nproperty float z\nend_header\n")
    return header.encode("ascii") + cloud.tobytes()


def read_ply(data: bytes) -> np.ndarray:
    """The (N, 3) float32 cloud of a PLY file as ``ply_bytes`` writes it (what the points route returns); another
    layout is a ValueError (general PLY files: trimesh)."""
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError("not a PLY file (no 'ply' magic or no end_header)")
    header = data[:end].decode("ascii", "replace").split("\n")
    expected = ["format binary_little_endian 1.0", "property float x", "property float y", "property float z"]
    vertices = [line for line in header if line.startswith("element vertex ")]
    if any(line not in header for line in expected) or len(vertices) != 1:
        raise ValueError("not a binary little-endian PLY of float x, y, z vertices")
    count = int(vertices[0].split()[-1])
    body = data[end + len(b"end_header\n"):]
    if len(body) != count * POINT_CHANNELS * 4:
        raise ValueError(f"PLY body holds {len(body)} bytes; {count} vertices need {count * POINT_CHANNELS * 4}")
    return np.frombuffer(body, dtype="<f4").reshape(count, POINT_CHANNELS).astype(np.float32)


def render_views(points: np.ndarray, views: int = 4, size: int = 128, elevation_deg: float = 20.0) -> np.ndarray:
    """(N,3) points on the unit sphere → a grid image (uint8 RGB) of ``views`` orthographic renders around the
    vertical axis: what curation captions and what ``jobs.generate`` writes beside a cloud.

    Each point is splatted as one pixel, nearest-first (z-buffer by sorting), shaded by depth so the shape reads.
    """
    cols = math.ceil(math.sqrt(views))
    rows = math.ceil(views / cols)
    canvas = np.full((rows * size, cols * size, 3), 255, dtype=np.uint8)
    el = math.radians(elevation_deg)
    tilt = np.array([[1, 0, 0], [0, math.cos(el), -math.sin(el)], [0, math.sin(el), math.cos(el)]])
    for v in range(views):
        az = 2 * math.pi * v / views
        spin = np.array([[math.cos(az), 0, math.sin(az)], [0, 1, 0], [-math.sin(az), 0, math.cos(az)]])
        p = points @ (tilt @ spin).T  # camera looks along -z; y up
        px = np.clip(((p[:, 0] + 1) / 2 * (size - 1)).round().astype(int), 0, size - 1)
        py = np.clip(((1 - (p[:, 1] + 1) / 2) * (size - 1)).round().astype(int), 0, size - 1)
        depth = (p[:, 2] + 1) / 2  # 1 = nearest
        order = np.argsort(depth)  # far first, so near points overwrite them
        shade = (40 + 180 * (1 - depth[order])).astype(np.uint8)
        tile = np.full((size, size, 3), 255, dtype=np.uint8)
        tile[py[order], px[order]] = shade[:, None]
        r, c = divmod(v, cols)
        canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = tile
    return canvas
