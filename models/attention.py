"""One attention entry point with three backends, plus the K/V pooling of Time-Aware Context Drop.

Backends (``backend=``):
- ``flash``: flash-attn varlen (CUDA, fp16/bf16, installed with the ``gpu`` extra): padding removed, GQA native;
- ``sdpa``: PyTorch scaled_dot_product_attention — no mask when nothing is padded (so the flash/efficient kernels can
  run), ``enable_gqa`` instead of repeating K/V heads;
- ``math``: a plain reference (fp32 softmax, repeated K/V) used to check the others;
- ``auto``: flash when available for the inputs, else sdpa.

Shapes: q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) with Hq a multiple of Hkv; key_mask (B, Nk) bool or None;
scale a float or a (B,) tensor (proportional attention gives each sample its own scale, see nextdit.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")

try:  # the optional `gpu` extra
    from flash_attn import flash_attn_varlen_func  # type: ignore

    HAS_FLASH_ATTN = True
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False


def _flash_usable(q: torch.Tensor) -> bool:
    return HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _per_sample_scale(q: torch.Tensor, scale: float | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Fold a per-sample scale into q so kernels that take one scalar can run: q·(s_b/s_0), scalar s_0."""
    default = 1.0 / math.sqrt(q.shape[-1])
    if scale is None:
        return q, default
    if isinstance(scale, torch.Tensor) and scale.numel() > 1:
        ratio = (scale.to(torch.float32) / default).view(-1, 1, 1, 1)
        return (q.float() * ratio).to(q.dtype), default
    return q, float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              scale: float | torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention with grouped K/V heads. Returns (B, Nq, Hq, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    if key_mask is not None and not torch.compiler.is_compiling() and bool(key_mask.all()):
        # Nothing padded: let the kernels run unmasked (eager only — under torch.compile this host-side check would
        # split the graph at every block; NextDiT.forward drops an all-true caption mask once per call instead).
        key_mask = None
    if backend == "auto":
        backend = "flash" if _flash_usable(q) else "sdpa"
    if backend == "flash":
        if not _flash_usable(q):
            raise RuntimeError("the flash backend needs flash-attn installed and CUDA fp16/bf16 inputs")
        return _flash(q, k, v, key_mask, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_mask, scale)
    return _math(q, k, v, key_mask, scale)


def _sdpa(q, k, v, key_mask, scale):
    q, scalar = _per_sample_scale(q, scale)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk): broadcast over heads/queries
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scalar,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _math(q, k, v, key_mask, scale):
    repeats = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(repeats, dim=2)
    v = v.repeat_interleave(repeats, dim=2)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device).reshape(-1, 1, 1, 1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = logits.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)


def _flash(q, k, v, key_mask, scale):
    q, scalar = _per_sample_scale(q, scale)
    batch, n_q = q.shape[:2]
    n_k = k.shape[1]
    q_lens = torch.full((batch,), n_q, dtype=torch.int32, device=q.device)
    k_lens = (key_mask.sum(1).to(torch.int32) if key_mask is not None
              else torch.full((batch,), n_k, dtype=torch.int32, device=q.device))
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    if key_mask is not None:  # keys are right-padded per sample: keep the valid prefix of each row
        k_flat, v_flat = k[key_mask], v[key_mask]
    else:
        k_flat, v_flat = k.flatten(0, 1), v.flatten(0, 1)
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k_flat, v_flat, cu_q, cu_k, n_q, int(k_lens.max()), softmax_scale=scalar
    )
    return out.view(batch, n_q, *out.shape[1:])


def pool_tokens(x: torch.Tensor, grids: list[tuple[int, ...]], kernel: int,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average-pool tokens (B, N, H, D) over kernel×kernel spatial windows of each sample's own (F, h, w) grid.

    Time-Aware Context Drop (paper §2.3; docs/design-decisions.md#time-aware-context-drop): keys and values after
    QK-norm and RoPE are merged, queries keep every token. Windows at the grid's edge average only the tokens they
    cover.
    Returns the pooled tokens, right-padded to the longest sample, and their mask (None when nothing is padded).
    """
    pooled = []
    for b, grid in enumerate(grids):
        frames, h, w = grid
        n = frames * h * w
        tokens = x[b, :n].reshape(frames, h, w, -1).permute(0, 3, 1, 2)  # (F, H·D, h, w)
        tokens = F.avg_pool2d(tokens.float(), kernel, stride=kernel, ceil_mode=True).to(x.dtype)
        pooled.append(tokens.permute(0, 2, 3, 1).reshape(-1, *x.shape[2:]))  # (F·h'·w', H, D)
    lengths = [p.shape[0] for p in pooled]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(pooled), None
    out = x.new_zeros(x.shape[0], longest, *x.shape[2:])
    new_mask = torch.zeros(x.shape[0], longest, dtype=torch.bool, device=x.device)
    for b, p in enumerate(pooled):
        out[b, : p.shape[0]] = p
        new_mask[b, : p.shape[0]] = True
    return out, new_mask
