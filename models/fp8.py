"""FP8 inference for Next-DiT: the transformer blocks' projections as float8 (e4m3) matmuls.

At 1024² a CFG-pair forward of the 2B model is ~32 TFLOP, three quarters of it in the blocks' projections (q/k/v/o,
caption k/v, SwiGLU w1/w2/w3); on Hopper an FP8 matmul has about twice the bf16 throughput (docs/benchmarks.md#anchors:
the bf16 floor alone is 42 ms against a 50 ms target). Scaling follows the usual recipe for inference (rowwise scaling):

- weights: quantized once, one scale per output channel, ``s_w[n] = max|W[n, :]| / 448``;
- activations: quantized on the fly, one scale per token, ``s_x[m] = max|x[m, :]| / 448``;
- ``y = (x / s_x)_{e4m3} · ((W / s_w)_{e4m3})ᵀ · s_x · s_wᵀ`` in one ``torch._scaled_mm`` with fp32 accumulation and a
  bf16 result.

Attention itself, the norms, adaLN modulation, embedders and the final layer stay in the model's dtype: they are a small
share of the FLOPs and the most sensitive to rounding. This is an inference transform (``quantize_fp8``); training and
checkpoints keep full-precision weights.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# The projections converted inside each TransformerBlock (official names); others stay as they are.
BLOCK_PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention.wk_y",
                     "attention.wv_y", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ALIGNMENT = 16  # FP8 matmuls need both matrix dimensions of the weight to be multiples of 16


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s) as e4m3 and s (rows × 1, fp32), with s ≈ max|row| / 448 so every row uses the full e4m3 range.

    Few passes over the activation, since in eager mode they run once per projection: max|row| in one reduction (no
    |x| temporary), one multiply in x's own dtype by 1/s rounded to that dtype, one cast. The rounded 1/s moves the
    row's maximum by at most 2⁻⁸ of 448, which e4m3 (spacing 32 there) rounds back to 448; s is taken as exactly the
    reciprocal of the rounded 1/s, so dequantisation stays consistent."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    inv_scale = (E4M3_MAX / amax.float().clamp_min(1e-12)).to(x.dtype)
    return (x * inv_scale).to(E4M3), inv_scale.float().reciprocal()


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 matmuls run on CUDA devices of compute capability ≥ 8.9 (Ada, Hopper, Blackwell) and, slowly, on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is stored in e4m3 with per-output-channel scales (see module doc)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (out, in) e4m3
        self.register_buffer("weight_scale", weight_scale)  # (1, out) fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        if linear.bias is not None:
            raise ValueError("Float8Linear converts bias-free projections only (Next-DiT's block projections)")
        weight, scale = quantize_rowwise(linear.weight.detach())
        return cls(weight, scale.reshape(1, -1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = quantize_rowwise(rows)
        # mat2 must be column-major: the transpose of the row-major (out, in) weight is exactly that.
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def quantize_fp8(model: nn.Module) -> int:
    """Replace the block projections of a Next-DiT (in eval mode) by :class:`Float8Linear`, in place; returns how many
    were converted (projections whose sizes are not multiples of 16 stay as they are)."""
    if model.training:
        raise ValueError("quantize_fp8 is an inference transform: call model.eval() first (training keeps bf16/fp32)")
    device = next(model.parameters()).device
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"FP8 matmuls need a GPU of compute capability ≥ 8.9 (H100, L40S, …); {name} has "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
    converted = 0
    for block in model.layers:
        for path in BLOCK_PROJECTIONS:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, name, None)
            if not isinstance(linear, nn.Linear):
                continue  # absent (no caption cross-attention in the class-conditional variant) or converted already
            if linear.in_features % ALIGNMENT or linear.out_features % ALIGNMENT:
                continue
            setattr(parent, name, Float8Linear.from_linear(linear))
            converted += 1
    return converted
