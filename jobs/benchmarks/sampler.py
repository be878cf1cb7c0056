"""``python -m jobs.bench sampler``: one midpoint sampler step (2 CFG evaluations = 2 forwards of a [cond; uncond] pair)
through our ``models.flow`` path against the same step on diffusers' LuminaNextDiT2DModel (same config, weights, inputs),
in one run; also ours with Time-Aware Context Drop at the noisy start (every block pooled). Prints device, timings, ratio.

GPU example (the targets of docs/benchmarks.md#targets):
``python -m jobs.bench sampler --device cuda --preset 2B-GQA --sizes 1024,2048``.
"""

from __future__ import annotations

import torch

from jobs.benchmarks import bench_parser
from jobs.benchmarks.model import build_pair, timed
from models import ContextDrop
from models.flow import apply_cfg, solve, velocity_fn
from models.geometry import VAE_DOWNSAMPLE


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("sampler", __doc__)
    parser.add_argument("--sizes", default="512", help="comma-separated square image sizes in pixels")
    parser.add_argument("--caption-len", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, peer, cfg = build_pair(args.preset, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | preset {args.preset} | {str(dtype).removeprefix('torch.')} | "
          "one midpoint step = 2 CFG-pair forwards")
    rope_table = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    for size in [int(s) for s in args.sizes.split(",")]:
        latent = size // VAE_DOWNSAMPLE
        gen = torch.Generator().manual_seed(size)
        x = torch.randn(1, cfg.in_channels, latent, latent, generator=gen).to(device)
        cond = torch.randn(1, args.caption_len, cfg.cap_feat_dim, generator=gen).to(device, dtype)
        uncond = torch.zeros(1, args.caption_len, cfg.cap_feat_dim, device=device, dtype=dtype)
        mask = torch.ones(1, args.caption_len, dtype=torch.bool, device=device)
        uncond_mask = mask.clone()
        uncond_mask[:, 1:] = False  # the empty prompt: one token
        grid = [0.0, 0.1]

        def ours_step(drop=None):
            fn = velocity_fn(ours, cond, mask, uncond, uncond_mask, guidance=args.guidance, context_drop=drop)
            with torch.no_grad():
                return solve(fn, x, grid, "midpoint").x

        def peer_velocity(z, t):  # what LuminaPipeline does per evaluation, in the flow convention
            pair = torch.cat([z, z]).to(dtype)
            out = peer(pair, torch.full((2,), t, device=device), torch.cat([cond, uncond]),
                       torch.cat([mask, uncond_mask]), rope_table,
                       cross_attention_kwargs={"base_sequence_length": cfg.base_tokens}, return_dict=False)[0]
            v_c, v_u = out[:, : cfg.in_channels].float().chunk(2)
            return apply_cfg(v_c, v_u, args.guidance)

        def peer_step():
            with torch.no_grad():
                return solve(peer_velocity, x, grid, "midpoint").x

        rel = float((ours_step() - peer_step()).norm() / peer_step().norm())
        ours_ms, _ = timed(ours_step, device, args.warmup, args.repeats)
        peer_ms, _ = timed(peer_step, device, args.warmup, args.repeats)
        drop_ms, _ = timed(lambda: ours_step(ContextDrop(0)), device, args.warmup, args.repeats)
        print(f"{size}²: ours {ours_ms:.1f} ms | diffusers {peer_ms:.1f} ms | ratio ours/peer {ours_ms / peer_ms:.3f} | "
              f"ours + Context Drop (t≈0: all blocks) {drop_ms:.1f} ms | rel. diff ours vs peer {rel:.1e}")
    return 0
