"""``python -m jobs.bench model``: our Next-DiT forward against diffusers' LuminaNextDiT2DModel, same config, weights
and inputs, in one run. Prints the device, both timings, the ratio (ours / peer; target ≤ 0.7 on CPU,
docs/benchmarks.md#targets) and the numerical agreement of the two outputs.

GPU example (the peer rows of docs/benchmarks.md#peer-on-one-h100):
``python -m jobs.bench model --device cuda --preset 2B-GQA --dtype bf16 --sizes 1024,2048``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from jobs.benchmarks import bench_parser
from models import NextDiT, preset
from models.formats import config_to_diffusers, official_to_diffusers
from models.geometry import VAE_DOWNSAMPLE


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median and min wall time (ms) of fn() after warm-up; CUDA is synchronised around each call."""
    (a, b), = timed_pair([fn], device, warmup, repeats)
    return a, b


def timed_pair(fns, device: torch.device, warmup: int, repeats: int) -> list[tuple[float, float]]:
    """Median and min wall time (ms) of each function, calls interleaved (A B A B …) so drifts of the machine's speed
    (frequency, other load) hit every contender alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            bucket.append((time.perf_counter() - start) * 1000)
    return [(statistics.median(t), min(t)) for t in times]


def works(label: str, fn) -> bool:
    """Runs an optional contender (FP8, compiled) once; a failure is printed and that contender dropped, so the rows
    that did run still come out (a device session is too short to lose them to one untried path)."""
    try:
        fn()
        return True
    except Exception as error:  # noqa: BLE001 - any failure of an optional contender is reported, not fatal
        print(f"{label}: failed, left out ({type(error).__name__}: {str(error).splitlines()[0][:300]})", flush=True)
        return False


def print_profile(fn, device: torch.device, rows: int = 15) -> None:
    """The operators that take one call's time, by self time on the device (where a GPU's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def peak_memory(fn, device: torch.device) -> float:
    """Peak GiB allocated during one call (CUDA only; NaN elsewhere)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def build_pair(preset_name: str, device, dtype, seed: int = 0, **overrides):
    """Our Next-DiT of a preset (with field overrides) and diffusers' LuminaNextDiT2DModel holding the same weights."""
    from diffusers import LuminaNextDiT2DModel

    cfg = preset(preset_name, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it runs: fast even for the 2B config
        ours = NextDiT(cfg)
    with torch.no_grad():  # non-zero gates/modulations so every path computes something real
        for name, p in ours.named_parameters():
            if "adaLN" in name or "gate" in name or "final_layer" in name or "cap_embedder.1" in name:
                p.normal_(std=0.02)
    peer_cfg = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        peer = LuminaNextDiT2DModel(**peer_cfg)
    peer.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True, assign=True)
    peer.to(device)
    return ours.to(device, dtype).eval(), peer.to(device, dtype).eval(), cfg


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("model", __doc__)
    parser.add_argument("--sizes", default="512", help="comma-separated square image sizes in pixels")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG pair")
    parser.add_argument("--caption-len", type=int, default=128, help="caption tokens; the second sample has half")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--fp8", action="store_true",
                        help="also time ours with FP8 block projections (models/fp8.py; CUDA capability ≥ 8.9)")
    parser.add_argument("--profile", action="store_true",
                        help="print the operators that take our forward's time at the first size (torch.profiler)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    ours, peer, cfg = build_pair(args.preset, device, dtype)
    params = sum(p.numel() for p in ours.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | preset {args.preset} ({params / 1e6:.1f} M params) | "
          f"{str(dtype).removeprefix('torch.')} | batch {args.batch}")
    rope_table = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    peer_kwargs = {"base_sequence_length": cfg.base_tokens}
    ours_fp8 = None
    if args.fp8:
        from models.fp8 import quantize_fp8

        ours_fp8 = copy.deepcopy(ours)
        quantize_fp8(ours_fp8)
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        latent = size // VAE_DOWNSAMPLE
        gen = torch.Generator().manual_seed(size)
        x = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=gen).to(device, dtype)
        t = torch.full((args.batch,), 0.5, device=device)
        feats = torch.randn(args.batch, args.caption_len, cfg.cap_feat_dim, generator=gen).to(device, dtype)
        mask = torch.ones(args.batch, args.caption_len, dtype=torch.bool, device=device)
        mask[1:, args.caption_len // 2:] = False

        def run_ours(model=ours):
            with torch.no_grad():
                return model(x, t, feats, mask)

        def run_peer(model=peer):
            with torch.no_grad():
                return model(x, t, feats, mask, rope_table, cross_attention_kwargs=peer_kwargs, return_dict=False)[0]

        with torch.no_grad():
            a, b = run_ours().float(), run_peer()[:, : cfg.in_channels].float()
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if ours_fp8 is not None and not works(f"{size}² ours FP8", lambda: run_ours(ours_fp8)):
            ours_fp8 = None
        contenders = [run_ours, run_peer] + ([lambda: run_ours(ours_fp8)] if ours_fp8 is not None else [])
        timings = timed_pair(contenders, device, args.warmup, args.repeats)  # FP8 in the same interleaved rounds
        (ours_ms, ours_min), (peer_ms, peer_min) = timings[:2]
        ours_mem, peer_mem = peak_memory(run_ours, device), peak_memory(run_peer, device)
        row = dict(size=size, tokens=(latent // cfg.patch_size) ** 2, ours_ms=ours_ms, peer_ms=peer_ms,
                   ratio=ours_ms / peer_ms, rel_err=rel, ours_gib=ours_mem, peer_gib=peer_mem, device=name,
                   preset=args.preset, dtype=str(dtype), batch=args.batch, compiled=False)
        print(f"{size}² ({row['tokens']} tokens/img): ours {ours_ms:8.1f} ms (min {ours_min:.1f}) | "
              f"diffusers {peer_ms:8.1f} ms (min {peer_min:.1f}) | ratio ours/peer {row['ratio']:.3f} | "
              f"rel. diff {rel:.1e} | peak GiB ours {ours_mem:.1f} peer {peer_mem:.1f}")
        results.append(row)
        if args.profile and size == results[0]["size"]:
            works("profile", lambda: print_profile(run_ours, device))
        if ours_fp8 is not None:
            f_ms = timings[2][0]
            fp8_rel = float((run_ours(ours_fp8).float() - a).norm() / a.norm())
            results.append(dict(row, ours_ms=f_ms, ratio=f_ms / peer_ms, fp8=True, rel_err_vs_ours=fp8_rel))
            print(f"{size}² ours FP8: {f_ms:8.1f} ms | diffusers {peer_ms:8.1f} ms | ratio {f_ms / peer_ms:.3f} | "
                  f"rel. diff vs ours {fp8_rel:.1e}")
        if args.compile:
            compiled_ours, compiled_peer = torch.compile(ours), torch.compile(peer)
            if not (works(f"{size}² ours compiled", lambda: run_ours(compiled_ours))
                    and works(f"{size}² diffusers compiled", lambda: run_peer(compiled_peer))):
                continue
            contenders = [lambda: run_ours(compiled_ours), lambda: run_peer(compiled_peer)]
            compiled_fp8 = torch.compile(ours_fp8) if ours_fp8 is not None else None
            if compiled_fp8 is not None and works(f"{size}² ours FP8 compiled", lambda: run_ours(compiled_fp8)):
                contenders.append(lambda: run_ours(compiled_fp8))
            timings = timed_pair(contenders, device, max(args.warmup, 2), args.repeats)
            (c_ours, _), (c_peer, _) = timings[:2]
            row_c = dict(row, ours_ms=c_ours, peer_ms=c_peer, ratio=c_ours / c_peer, compiled=True)
            print(f"{size}² compiled: ours {c_ours:8.1f} ms | diffusers {c_peer:8.1f} ms | "
                  f"ratio {row_c['ratio']:.3f} | ours compiled vs peer eager {c_ours / peer_ms:.3f}")
            results.append(row_c)
            if len(timings) > 2:
                c_fp8 = timings[2][0]
                results.append(dict(row_c, ours_ms=c_fp8, ratio=c_fp8 / c_peer, fp8=True))
                print(f"{size}² compiled: ours FP8 {c_fp8:8.1f} ms | ratio vs compiled peer {c_fp8 / c_peer:.3f} | "
                      f"vs peer eager {c_fp8 / peer_ms:.3f}")
    if args.json:
        with open(args.json, "a") as f:
            for row in results:
                f.write(json.dumps(row) + "\n")
    return 0
