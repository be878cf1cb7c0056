"""Next-DiT: the Lumina-Next flow-based diffusion transformer (paper §2.1; the official constants:
docs/official-formats.md#architecture-constants).

One small class per idea, DiT-style. The state-dict names are the official ones
(docs/official-formats.md#checkpoint-layout), so the official checkpoint layout is our own; checkpoint.py maps the
diffusers layout onto it.

Call: ``model(x, t, cap_feats, cap_mask)`` with x a (B,C,H,W) / (B,C,F,H,W) tensor or a list of (C,[F,]H_i,W_i) tensors of
different sizes, t in [0,1] (0 noise, 1 data). Returns the velocity in the same form (the first C output channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.attention import attention, pool_tokens
from models.points import PointEmbedder, fourier_frequencies
from models.presets import NextDiTConfig
from models.rope import NDRotaryEmbedding, RopeScaling, apply_rope

TIMESTEP_FREQ_DIM = 256  # sinusoidal features of t before the MLP (docs/official-formats.md#architecture-constants)
TIMESTEP_MAX_PERIOD = 10000.0
FINAL_NORM_EPS = 1e-6


@dataclass
class ContextDrop:
    """Time-Aware Context Drop (paper §2.3; our form of it: docs/design-decisions.md#time-aware-context-drop).

    Self-attention keys/values are average-pooled over ``kernel``×``kernel`` windows in the first round((1−t)·L) of the
    L blocks (all blocks at the noisy start, none at the clean end); queries keep every token. Active only for samples
    with at least ``min_tokens`` image tokens.
    """

    min_tokens: int = 0
    kernel: int = 2

    def __post_init__(self):
        if self.kernel < 2:
            raise ValueError(f"context-drop kernel must be ≥ 2, got {self.kernel}")

    def pooled_blocks(self, t: float, n_layers: int) -> int:
        return int(round((1.0 - float(t)) * n_layers))


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²)+eps) in fp32, cast back, times a learnable weight (none for the parameter-free variant)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return out * self.weight if self.weight is not None else out


class TimestepEmbedder(nn.Module):
    """t in [0,1] (not ×1000) → [cos, sin] features of 256 → MLP to the conditioning width."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(dtype))


class LabelEmbedder(nn.Module):
    """Class label → embedding; index ``num_classes`` is the null class used for CFG (DiT / Next-DiT ImageNet)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Self-attention over image tokens + gated cross-attention to the caption, one shared query and output projection.

    q/k get a LayerNorm across all heads jointly (QK-norm), then RoPE; the cross-attention reuses the rotated query, its
    keys get no RoPE, and its output is added per head through tanh(gate) (zero at init) before ``wo``.
    """

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.backend = cfg.attention_backend
        self.wq = nn.Linear(cfg.dim, nh * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, nkv * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, nkv * hd, bias=False)
        self.wo = nn.Linear(nh * hd, cfg.dim, bias=False)
        norm = (lambda n: nn.LayerNorm(n, eps=1e-5)) if cfg.qk_norm else (lambda n: nn.Identity())
        self.q_norm, self.k_norm = norm(nh * hd), norm(nkv * hd)
        self.cross = cfg.conditioning == "text"
        if self.cross:
            self.wk_y = nn.Linear(cfg.cap_feat_dim, nkv * hd, bias=False)
            self.wv_y = nn.Linear(cfg.cap_feat_dim, nkv * hd, bias=False)
            self.ky_norm = norm(nkv * hd)
            self.gate = nn.Parameter(torch.zeros(nh))

    def forward(self, x, x_mask, rope, y, y_mask, self_scale, pool=None):
        batch, n = x.shape[:2]
        q = self.q_norm(self.wq(x)).view(batch, n, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x)).view(batch, n, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, n, self.n_kv_heads, self.head_dim)
        if rope is not None:  # point clouds have none: a set has no positions
            q, k = apply_rope(q, rope), apply_rope(k, rope)

        if pool is not None:  # Context Drop: merge keys/values spatially, keep every query
            grids, kernel = pool
            k, k_mask = pool_tokens(k, grids, kernel, x_mask)
            v, _ = pool_tokens(v, grids, kernel, x_mask)
        else:
            k_mask = x_mask
        out = attention(q, k, v, k_mask, self_scale, self.backend)  # (B, N, H, hd)

        if self.cross:
            ny = y.shape[1]
            ky = self.ky_norm(self.wk_y(y)).view(batch, ny, self.n_kv_heads, self.head_dim)
            vy = self.wv_y(y).view(batch, ny, self.n_kv_heads, self.head_dim)
            cross = attention(q, ky, vy, y_mask, None, self.backend)  # default 1/sqrt(hd): never proportional
            out = out + torch.tanh(self.gate).view(1, 1, -1, 1).to(out.dtype) * cross
        return self.wo(out.flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich RMSNorm around attention and FFN, tanh-gated scale-only adaLN-Zero (no shift):

    h   = x + tanh(g_msa) ⊙ norm2(Attn(norm1(x)·(1+s_msa)))
    out = h + tanh(g_mlp) ⊙ ffn_norm2(FFN(ffn_norm1(h)·(1+s_mlp)))
    """

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        # The ImageNet variant's pre-norms are parameter-free (docs/official-formats.md#size-configs).
        pre_affine = cfg.conditioning == "text"
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps, affine=pre_affine)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps, affine=pre_affine)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.conditioning == "text":
            self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 4 * cfg.dim))
        self.activation_checkpointing = False

    def forward(self, x, x_mask, rope, y, y_mask, c, self_scale, pool=None):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
        if y is not None:
            y = self.attention_y_norm(y)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), x_mask, rope, y, y_mask, self_scale, pool)
        x = x + torch.tanh(gate_msa) * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + torch.tanh(gate_mlp) * self.ffn_norm2(ffn)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by the condition, then a linear to p·p·C_out.

    T2I: scale only (no shift); the ImageNet variant has shift and scale (docs/official-formats.md#size-configs).
    """

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.with_shift = cfg.conditioning == "class"
        self.norm_final = nn.LayerNorm(cfg.dim, eps=FINAL_NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, (2 if self.with_shift else 1) * cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).unsqueeze(1)
        if self.with_shift:
            shift, scale = modulation.chunk(2, dim=-1)
            return self.linear(self.norm_final(x) * (1 + scale) + shift)
        return self.linear(self.norm_final(x) * (1 + modulation))


class NextDiT(nn.Module):
    def __init__(self, config: NextDiTConfig):
        super().__init__()
        cfg = self.config = config
        p = cfg.patch_size
        self.points = cfg.modality == "points"
        if self.points:  # coordinates → Time-Aware Scaled Fourier Features → linear (paper §5.3)
            self.x_embedder = PointEmbedder(cfg.fourier_features, cfg.fourier_max_freq, cfg.rope_sides[2], cfg.dim)
        else:
            self.x_embedder = nn.Linear(p * p * cfg.in_channels, cfg.dim)
        self.pad_token = nn.Parameter(torch.empty(cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        if cfg.conditioning == "text":
            # Pooled caption → LayerNorm → Linear (zero-initialised): the text part of the adaLN condition.
            self.cap_embedder = nn.Sequential(nn.LayerNorm(cfg.cap_feat_dim), nn.Linear(cfg.cap_feat_dim, cfg.cond_dim))
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg)
        self.rope = None if self.points else NDRotaryEmbedding.for_model(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the reference: xavier-uniform linears with zero biases; N(0, 0.02) for the timestep MLP, label table and
        pad token; zero for every modulation, cross-attention gate, the caption projection and the output layer, so each
        block starts as the identity and the model as zero velocity.

        Submodules are initialised through ``Module.apply``, the hook DeepSpeed's ``zero.Init`` gathers a module's
        partitioned parameters around: the same code initialises a model that is built already sharded."""

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        def normal(module: nn.Module) -> None:
            nn.init.normal_(module.weight, std=0.02)

        def zeros(module: nn.Module) -> None:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

        self.apply(xavier)
        nn.init.normal_(self.pad_token, std=0.02)  # the root's own parameter: not partitioned before __init__ returns
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            linear.apply(normal)
        if self.config.conditioning == "text":
            self.cap_embedder[1].apply(zeros)
        else:
            self.y_embedder.embedding_table.apply(normal)
        for block in self.layers:
            block.adaLN_modulation[1].apply(zeros)
        for linear in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            linear.apply(zeros)

    # ----------------------------------------------------------------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool = True, every: int = 1) -> None:
        """Recompute every ``every``-th block's activations in backward (non-reentrant)."""
        for i, block in enumerate(self.layers):
            block.activation_checkpointing = enabled and i % every == 0

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def patchify(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """(C, F, H, W) → tokens (F·H/p·W/p, C·p·p) in row-major order, features channel-major (C, ph, pw)."""
        p = self.config.patch_size
        tokens, grids = [], []
        for img in images:
            c, frames, h, w = img.shape
            if h % p or w % p:
                raise ValueError(f"latent size {h}×{w} is not a multiple of the patch size {p}")
            grid = (frames, h // p, w // p)
            patches = img.view(c, frames, grid[1], p, grid[2], p).permute(1, 2, 4, 0, 3, 5)
            tokens.append(patches.reshape(-1, c * p * p))
            grids.append(grid)
        return tokens, grids

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(N, p·p·C_out) with features (ph, pw, C) channel-last → (C_in, F, H, W): the first C_in channels."""
        p, c_out = self.config.patch_size, self.config.out_channels
        frames, h, w = grid
        out = tokens[: frames * h * w].view(frames, h, w, p, p, c_out).permute(5, 0, 1, 3, 2, 4)
        return out.reshape(c_out, frames, h * p, w * p)[: self.config.in_channels]

    def embed(self, tokens: torch.Tensor, t: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
        """(B, N, C·p·p) patches → (B, N, dim): a linear layer; for point clouds the Fourier features of the
        coordinates, their frequencies scaled for the cloud's density and t by the scaling mode (models/points.py)."""
        if self.points:
            return self.x_embedder(tokens, t, scaling.mode if scaling is not None else "none")
        return self.x_embedder(tokens)

    def rope_tables(self, grids, t, scaling, n_tokens, device):
        """Unit complex rotations e^{iφ} (B, N, hd/2). Pad positions copy the last valid position
        (docs/official-formats.md#architecture-constants)."""
        time_dependent = scaling is not None and scaling.mode in ("time_aware", "official_switch")
        cache, rows = {}, []
        for grid, t_i in zip(grids, t.tolist()):
            key = (grid, t_i if time_dependent else None)
            if key not in cache:
                cache[key] = self.rope.angles(grid, t_i, scaling, device)
            angles = cache[key]
            if angles.shape[0] < n_tokens:
                angles = torch.cat([angles, angles[-1:].expand(n_tokens - angles.shape[0], -1)])
            rows.append(angles)
        angles = torch.stack(rows)
        return torch.polar(torch.ones_like(angles), angles)

    def attention_scale(self, lengths: list[int], device,
                        proportional: bool | None = None) -> float | torch.Tensor | None:
        """Proportional attention (docs/official-formats.md#rope): sqrt(log_{N_base} N / hd) with N each sample's
        own tokens; None (the default 1/sqrt(hd)) when ``proportional`` is off (None: the config's switch)."""
        if not (self.config.proportional_attn if proportional is None else proportional):
            return None
        hd, base = self.config.head_dim, self.config.base_tokens
        scales = [math.sqrt(math.log(n, base) / hd) if n > 1 else 1.0 / math.sqrt(hd) for n in lengths]
        if all(s == scales[0] for s in scales):
            return scales[0]
        return torch.tensor(scales, dtype=torch.float32, device=device)

    def forward(self, x, t, cap_feats=None, cap_mask=None, labels=None, rope_scaling: RopeScaling | None = None,
                context_drop: ContextDrop | None = None, proportional_attn: bool | None = None):
        """``proportional_attn``: None follows ``config.proportional_attn`` (on: the sampling-time scale); the
        trainer passes its own switch, off by default, because the official recipe trains without it
        (docs/training.md, "Proportional attention")."""
        cfg = self.config
        is_list = isinstance(x, (list, tuple))
        images = list(x) if is_list else list(x.unbind(0))
        images = [img.unsqueeze(1) if img.ndim == 3 else img for img in images]  # (C, F, H, W)
        five_d = (not is_list and x.ndim == 5) or (is_list and x[0].ndim == 4)
        batch = len(images)
        device = images[0].device
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(batch)

        # Tokens, padded with the learned pad token to the longest sample.
        tokens, grids = self.patchify(images)
        lengths = [tok.shape[0] for tok in tokens]
        n_tokens = max(lengths)
        if all(n == n_tokens for n in lengths):
            h = self.embed(torch.stack(tokens), t, rope_scaling)
            x_mask = None
        else:
            embedded = [self.embed(tok[None], t[b: b + 1], rope_scaling)[0] for b, tok in enumerate(tokens)]
            h = self.pad_token.to(embedded[0].dtype).expand(batch, n_tokens, -1).clone()
            x_mask = torch.zeros(batch, n_tokens, dtype=torch.bool, device=device)
            for b, emb in enumerate(embedded):
                h[b, : emb.shape[0]] = emb
                x_mask[b, : emb.shape[0]] = True
        rope = None if self.points else self.rope_tables(grids, t, rope_scaling, n_tokens, device)
        self_scale = self.attention_scale(lengths, device, proportional_attn)

        # Conditioning vector c = t_emb + pooled caption (or label) embedding, (B, D_c).
        c = self.t_embedder(t, h.dtype)
        if cfg.conditioning == "text":
            if cap_feats is None or cap_mask is None:
                raise ValueError("a text-conditioned Next-DiT needs cap_feats and cap_mask")
            if cap_feats.shape[0] != batch or cap_feats.shape[-1] != cfg.cap_feat_dim:
                raise ValueError(
                    f"cap_feats has shape {tuple(cap_feats.shape)}; expected ({batch}, L, {cfg.cap_feat_dim})"
                )
            cap_mask = cap_mask.bool()
            c = c + self.cap_embedder(masked_mean(cap_feats, cap_mask))
            # One host-side check per call, so that unpadded captions reach every block's attention without a mask.
            y, y_mask = cap_feats, (None if bool(cap_mask.all()) else cap_mask)
        else:
            if labels is None:
                raise ValueError("a class-conditioned Next-DiT needs labels (use num_classes for the null class)")
            c = c + self.y_embedder(labels.to(device))
            y = y_mask = None

        drop_blocks = 0
        if context_drop is not None and self.points:
            raise ValueError("Context Drop merges neighbouring tokens of a grid; a point cloud has no grid")
        if context_drop is not None and n_tokens >= context_drop.min_tokens:
            drop_blocks = context_drop.pooled_blocks(float(t[0]), cfg.n_layers)
        for i, block in enumerate(self.layers):
            pool = (grids, context_drop.kernel) if i < drop_blocks else None
            if block.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, x_mask, rope, y, y_mask, c, self_scale, pool, use_reentrant=False)
            else:
                h = block(h, x_mask, rope, y, y_mask, c, self_scale, pool)

        h = self.final_layer(h, c)  # (B, N, p·p·C_out)
        outputs = [self.unpatchify(h[b], grids[b]) for b in range(batch)]
        if not five_d:
            outputs = [o.squeeze(1) for o in outputs]
        return outputs if is_list else torch.stack(outputs)

    # Checkpoint files are models/checkpoint.py's (it never imports this module); these are the entry points.
    @classmethod
    def from_pretrained(cls, path: str, ema: bool = False, device="cpu", dtype: torch.dtype | None = None) -> NextDiT:
        """Load our model folder, an official consolidated checkpoint or a diffusers folder (local or s3://); ``ema``:
        its EMA weights. The folder's metadata (text encoder / VAE references) is ``checkpoint.read_checkpoint``'s."""
        from models.checkpoint import read_checkpoint

        cfg, state, _ = read_checkpoint(path, ema=ema)
        return cls.from_state_dict(cfg, state, device, dtype)

    @classmethod
    def from_state_dict(cls, cfg: NextDiTConfig, state: dict[str, torch.Tensor], device="cpu",
                        dtype: torch.dtype | None = None) -> NextDiT:
        """A model with exactly these weights; missing, unexpected or mis-shaped keys raise a ``CheckpointError``.
        ``device="meta"`` only checks them."""
        from models.formats import CheckpointError

        with torch.device("meta"):
            model = cls(cfg)
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
        # Non-persistent buffers (the RoPE pair layout, the points' Fourier ladder) are not in the state dict: rebuild
        # them off the meta device.
        if model.points:
            model.x_embedder.freqs = fourier_frequencies(cfg.fourier_features, cfg.fourier_max_freq)
        else:
            model.rope = NDRotaryEmbedding.for_model(cfg)
        return model.to(device)

    def save_pretrained(self, path: str, fmt: str = "ours", ema_state: dict[str, torch.Tensor] | None = None,
                        metadata: dict | None = None) -> None:
        """Write the model (local or s3://) in ``fmt``: ours, official or diffusers."""
        from models.checkpoint import write_checkpoint

        write_checkpoint(self.config, self.state_dict(), path, fmt, ema_state, metadata)


def masked_mean(cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the caption features over tokens."""
    weights = cap_mask.to(torch.float32).unsqueeze(-1)
    return ((cap_feats * weights).sum(1) / weights.sum(1)).to(cap_feats.dtype)
