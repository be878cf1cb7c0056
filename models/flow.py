"""Flow matching: the ONE place for the time convention, interpolation, t sampling, loss, caption dropout and CFG.

The trainer, ``jobs.generate`` and the Serve replica all import this module (docs/architecture.md#dependency-rules), so
training and inference cannot drift. Schedules and solvers live beside it (models/schedules.py, models/solvers.py) and
are re-exported.

Convention (docs/design-decisions.md#time-convention; docs/official-formats.md#flow-matching-and-sampling): t = 0 is
pure noise, t = 1 is data, x_t = t·x1 + (1−t)·x0 with x1 the data latent and x0 ~ N(0, I), the model predicts the
velocity u = x1 − x0, and sampling integrates dx/dt = v(x, t) from t = 0 to t = 1. The model's t input is the same t in
[0, 1] (no ×1000).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from models.schedules import (
    SCHEDULES,
    RationalSchedule,
    Schedule,
    ScheduleConfig,
    SigmoidSchedule,
    UniformSchedule,
    make_schedule,
)
from models.solvers import SOLVERS, SolveResult, check_solver, nfe_for, solve

Latents = Union[torch.Tensor, list]
T_SAMPLING = ("uniform", "lognorm", "shift")
CAPTION_DROPOUT_PROB = 0.1  # official caption_dropout_prob (docs/official-formats.md#text-encoder)


@dataclass
class FlowConfig:
    """Training-time flow-matching settings (the official ``--snr_type``:
    docs/official-formats.md#flow-matching-and-sampling)."""

    # "uniform": t ~ U(0,1) (official default); "lognorm": t = sigmoid(N(mean, std)); "shift": u ~ U(0,1),
    # t = s·u / (1 + (s−1)·u) — with t = 1 = data, s > 1 pushes t toward the data end (the official "shift_s").
    t_sampling: str = "uniform"
    lognorm_mean: float = 0.0
    lognorm_std: float = 1.0
    shift: float = 1.0
    caption_dropout: float = CAPTION_DROPOUT_PROB  # probability of replacing a caption by "" (for CFG)

    def __post_init__(self):
        if self.t_sampling not in T_SAMPLING:
            raise ValueError(f"unknown t sampling {self.t_sampling!r}; choose one of {', '.join(T_SAMPLING)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.lognorm_std <= 0 or self.shift <= 0:
            raise ValueError("lognorm_std and shift must be positive")


# ---------------------------------------------------------------------------------------------------------------------
# Training: t sampling, interpolation, target, loss
def sample_t(n: int, config: FlowConfig | None = None, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """n training times in [0, 1] (fp32) drawn as ``config.t_sampling`` says."""
    config = config or FlowConfig()
    if config.t_sampling == "lognorm":
        u = torch.randn(n, generator=generator) * config.lognorm_std + config.lognorm_mean
        t = torch.sigmoid(u)
    else:
        u = torch.rand(n, generator=generator)
        s = config.shift if config.t_sampling == "shift" else 1.0
        t = s * u / (1.0 + (s - 1.0) * u)
    return t.to(device)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar time of one sample, broadcastable against that sample's tensor."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Latents, x1: Latents, t: torch.Tensor) -> Latents:
    """x_t = t·x1 + (1−t)·x0; t is (B,), x a (B, …) tensor or a list of B tensors."""
    if isinstance(x1, torch.Tensor):
        tb = _per_sample(t, x1)
        return tb * x1 + (1 - tb) * x0
    return [t[i].to(a.dtype) * a + (1 - t[i].to(a.dtype)) * z for i, (z, a) in enumerate(zip(x0, x1))]


def velocity_target(x0: Latents, x1: Latents) -> Latents:
    """u = x1 − x0: the constant velocity of the straight path from noise to data."""
    if isinstance(x1, torch.Tensor):
        return x1 - x0
    return [a - z for z, a in zip(x0, x1)]


def per_sample_loss(pred: Latents, target: Latents) -> torch.Tensor:
    """(B,) fp32: mean over all elements of (pred − target)² per sample; a list batch gives one scalar per image, so every
    image weighs the same whatever its resolution (docs/official-formats.md#flow-matching-and-sampling)."""
    if isinstance(pred, torch.Tensor):
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return torch.stack([(p.float() - u.float()).pow(2).mean() for p, u in zip(pred, target)])


def noise_like(x1: Latents, generator: torch.Generator | None = None) -> Latents:
    if isinstance(x1, torch.Tensor):
        return torch.randn(x1.shape, generator=generator, dtype=torch.float32).to(x1.device, x1.dtype)
    return [torch.randn(a.shape, generator=generator, dtype=torch.float32).to(a.device, a.dtype) for a in x1]


def flow_matching_loss(model: Callable, x1: Latents, *model_args, t: torch.Tensor | None = None,
                       noise: Latents | None = None, config: FlowConfig | None = None,
                       generator: torch.Generator | None = None, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch loss, per-sample losses) of ``model(x_t, t, *model_args, **model_kwargs)`` against x1 − x0.

    The batch loss is the sum of per-sample losses over the local batch size, as the official code
    (docs/official-formats.md#flow-matching-and-sampling)."""
    batch = x1.shape[0] if isinstance(x1, torch.Tensor) else len(x1)
    ref = x1 if isinstance(x1, torch.Tensor) else x1[0]
    if t is None:
        t = sample_t(batch, config, generator, ref.device)
    t = t.to(ref.device, torch.float32)
    x0 = noise if noise is not None else noise_like(x1, generator)
    pred = model(interpolate(x0, x1, t), t, *model_args, **model_kwargs)
    losses = per_sample_loss(pred, velocity_target(x0, x1))
    return losses.sum() / batch, losses


# ---------------------------------------------------------------------------------------------------------------------
# Caption dropout (trains the unconditional branch CFG needs)
def caption_keep_mask(n: int, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: True where the caption is kept, False (with probability ``prob``) where it is replaced by ""."""
    return torch.rand(n, generator=generator) >= prob


def drop_captions(captions: list[str], prob: float = CAPTION_DROPOUT_PROB,
                  generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt "" with probability ``prob`` (official caption dropout)."""
    keep = caption_keep_mask(len(captions), prob, generator)
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def drop_caption_features(cap_feats: torch.Tensor, cap_mask: torch.Tensor, null_feats: torch.Tensor,
                          null_mask: torch.Tensor, prob: float = CAPTION_DROPOUT_PROB,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption dropout on precomputed features: rows are replaced by the empty prompt's features (1, L0, D) / (1, L0),
    which are right-padded or cut to the batch's caption length (their mask is what matters)."""
    keep = caption_keep_mask(cap_feats.shape[0], prob, generator).to(cap_feats.device)
    length = cap_feats.shape[1]
    null_feats, null_mask = pad_captions(null_feats, null_mask, max(length, null_feats.shape[1]))
    null_feats, null_mask = null_feats[:, :length], null_mask[:, :length]
    feats = torch.where(keep[:, None, None], cap_feats, null_feats.to(cap_feats.dtype))
    mask = torch.where(keep[:, None], cap_mask.bool(), null_mask.bool())
    return feats, mask


def pad_captions(feats: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad caption features (B, L, D) and mask (B, L) with zeros / False to ``length`` tokens."""
    extra = length - feats.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {feats.shape[1]} caption tokens down to {length}")
    if extra == 0:
        return feats, mask.bool()
    return F.pad(feats, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


# ---------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
def apply_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float, channels: int | None = None,
              channel_dim: int = 1) -> torch.Tensor:
    """v = v_u + g·(v_c − v_u). ``channel_dim`` is 1 for a (B, C, …) batch, 0 for one (C, …) sample.

    ``channels=None`` guides every channel (our default); ``channels=3`` is the official rule: only the first 3 latent
    channels are guided and the rest keep the conditional prediction, for bit-faithful official images
    (docs/design-decisions.md#cfg-on-every-channel).
    """
    guided = v_uncond + guidance * (v_cond - v_uncond)
    if channels is None:
        return guided
    rest = v_cond.shape[channel_dim] - channels
    return torch.cat([guided.narrow(channel_dim, 0, channels), v_cond.narrow(channel_dim, channels, rest)], channel_dim)


def velocity_fn(model: Callable, cap_feats: torch.Tensor | None = None, cap_mask: torch.Tensor | None = None,
                uncond_feats: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
                guidance: float = 1.0, cfg_channels: int | None = None, dtype: torch.dtype | None = None, *,
                labels: torch.Tensor | None = None, uncond_labels: torch.Tensor | None = None,
                **forward_kwargs) -> Callable[[Latents, float], Latents]:
    """The ODE right-hand side v(x, t) of a text- or class-conditioned Next-DiT, with CFG.

    The conditioning is either caption features (``cap_feats`` (B, L, D), ``cap_mask`` (B, L); the unconditional branch
    ``uncond_feats`` / ``uncond_mask``, usually the negative prompt's) or class labels (``labels`` (B,) LongTensor; the
    unconditional branch ``uncond_labels`` (B,), usually the null class ``num_classes``), never both.

    With guidance ≠ 1 the conditional and unconditional branches run as ONE forward on the batch [cond; uncond] (the
    same latents twice; both captions padded to one length). The solver state stays in fp32; the model runs in
    ``dtype`` (default: the model's). ``forward_kwargs`` (rope_scaling, context_drop) go to every forward, so
    time-dependent RoPE modes and Context Drop see each evaluation's own t.
    """
    if (labels is None) == (cap_feats is None):
        raise ValueError("velocity_fn needs exactly one conditioning: caption features (cap_feats, cap_mask) or labels")
    model_dtype = dtype or getattr(model, "dtype", torch.float32)
    # The conditioning of the [cond; uncond] batch, as the model takes it: positional captions or the labels keyword.
    if labels is not None:
        guided = guidance != 1.0 and uncond_labels is not None
        cond_args, cond_kwargs = (), {"labels": torch.cat([labels, uncond_labels]) if guided else labels}
        device = labels.device
    else:
        if cap_mask is None:
            raise ValueError("velocity_fn: cap_feats given without cap_mask")
        guided = guidance != 1.0 and uncond_feats is not None
        if guided:
            length = max(cap_feats.shape[1], uncond_feats.shape[1])
            cond = pad_captions(cap_feats, cap_mask, length)
            uncond = pad_captions(uncond_feats, uncond_mask, length)
            feats, mask = torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]])
        else:
            feats, mask = cap_feats, cap_mask.bool()
        cond_args, cond_kwargs = (feats.to(model_dtype), mask), {}
        device = feats.device

    def fn(x: Latents, t: float) -> Latents:
        is_list = not isinstance(x, torch.Tensor)
        batch = len(x) if is_list else x.shape[0]
        x_in = [xi.to(model_dtype) for xi in x] if is_list else x.to(model_dtype)
        if guided:
            x_in = x_in + x_in if is_list else torch.cat([x_in, x_in])
        n = 2 * batch if guided else batch
        t_in = torch.full((n,), float(t), dtype=torch.float32, device=device)
        out = model(x_in, t_in, *cond_args, **cond_kwargs, **forward_kwargs)
        outs = [o.float() for o in out] if is_list else out.float()
        if not guided:
            return outs
        if is_list:
            return [apply_cfg(outs[i], outs[batch + i], guidance, cfg_channels, channel_dim=0) for i in range(batch)]
        return apply_cfg(outs[:batch], outs[batch:], guidance, cfg_channels)

    return fn


__all__ = [
    "CAPTION_DROPOUT_PROB",
    "SCHEDULES",
    "SOLVERS",
    "FlowConfig",
    "RationalSchedule",
    "Schedule",
    "ScheduleConfig",
    "SigmoidSchedule",
    "SolveResult",
    "UniformSchedule",
    "apply_cfg",
    "caption_keep_mask",
    "check_solver",
    "drop_caption_features",
    "drop_captions",
    "flow_matching_loss",
    "interpolate",
    "make_schedule",
    "nfe_for",
    "noise_like",
    "pad_captions",
    "per_sample_loss",
    "sample_t",
    "solve",
    "velocity_fn",
    "velocity_target",
]
