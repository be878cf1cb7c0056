"""``python -m jobs.bench train``: one optimizer step of Next-DiT exactly as ``jobs.train`` takes it — the DeepSpeed
engine of ``jobs.training.parallelize`` (ZeRO-3, bf16 on CUDA, activation checkpointing as configured), the
flow-matching loss, backward, clipped AdamW step and the sharded EMA update — on one device, beside the peer
row of docs/benchmarks.md#peer-on-one-h100 measured in the same run: diffusers' ``LuminaNextDiT2DModel`` forward +
backward with fp32 parameters under bf16 autocast (no optimizer step), same config, weights, batch and inputs.

Per bucket (``SIZE:MICRO_BATCH``) it prints samples/s, tokens/s, model TFLOP/s and MFU, and where our step's time
goes: the median of each phase (forward with the loss; backward with the recomputation and ZeRO-3's gradient
reduce-scatter; optimizer step; EMA) over a second set of steps whose phases are synchronised one by one. Model FLOPs
are those of ``jobs.training.metrics.train_flops`` (forward + backward = 3 × forward; recomputation not counted) and
MFU is taken against the bf16 matmul ceiling measured in the same run (the convention of docs/benchmarks.md#targets)
and against the datasheet peak.
``--max-batch N`` also reports the largest micro-batch that fits each bucket (CUDA): peak memory is measured at the
given micro-batch and at twice it, extrapolated linearly to the card's memory, and the prediction is run to confirm it
and to time the step at that micro-batch.

GPU (docs/benchmarks.md#targets):
``python -m jobs.bench train --device cuda --preset 2B-GQA --sizes 512:4,1024:1 --max-batch 64``.
The peer and our engine never share the card: the peer is timed first, then freed (both together overflow 80 GB).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from jobs.benchmarks import bench_parser
from jobs.benchmarks.model import build_pair, timed
from jobs.runtime import free_port
from jobs.training.config import TrainJobConfig
from jobs.training.metrics import PEAK_TFLOPS, train_flops
from models.config_io import from_dict
from models.flow import flow_matching_loss
from models.geometry import VAE_DOWNSAMPLE, pixels_per_token


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """'512:4,1024:1' → [(512, 4), (1024, 1)] (square image side in pixels, micro-batch)."""
    out = []
    for part in text.split(","):
        size, _, batch = part.partition(":")
        out.append((int(size), int(batch or 1)))
    return out


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of one large matmul on random data (bf16 8192³ on CUDA; fp32 1024³ on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = timed(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (ms / 1000)


def init_single_process_group(device: torch.device) -> None:
    """A world of one for DeepSpeed (what Ray Train sets up on each worker)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def make_inputs(cfg, size: int, batch: int, caption_len: int, device: torch.device):
    """Latents, t, noise and captions (the second half of the batch has half-padded captions), seeded by the size."""
    latent = size // VAE_DOWNSAMPLE
    gen = torch.Generator().manual_seed(size * 1000 + batch)
    x1 = torch.randn(batch, cfg.in_channels, latent, latent, generator=gen)
    noise = torch.randn(batch, cfg.in_channels, latent, latent, generator=gen)
    t = torch.rand(batch, generator=gen)
    feats = torch.randn(batch, caption_len, cfg.cap_feat_dim, generator=gen)
    return [v.to(device) for v in (x1, t, noise, feats, caption_mask(batch, caption_len))]


def caption_mask(batch: int, caption_len: int) -> torch.Tensor:
    """The captions' mask: the second half of the batch keeps only the first half of its tokens."""
    mask = torch.ones(batch, caption_len, dtype=torch.bool)
    mask[batch // 2:, caption_len // 2:] = False
    return mask


def caption_tokens(batch: int, caption_len: int) -> float:
    """Mean unpadded caption length of ``make_inputs``' batch (what the FLOP count sees)."""
    return float(caption_mask(batch, caption_len).sum(1).float().mean())


class PhaseClock:
    """Wall time between ``lap`` calls, the device synchronised at each, appended to ``phases[name]`` (no-op when
    ``phases`` is None, so the timed step itself never synchronises mid-step)."""

    def __init__(self, device: torch.device, phases: dict[str, list[float]] | None):
        self.device, self.phases = device, phases
        self.last = self._now() if phases is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.phases is None:
            return
        now = self._now()
        self.phases.setdefault(name, []).append((now - self.last) * 1000)
        self.last = now


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("train", __doc__)
    parser.add_argument("--sizes", default="256:2", help="buckets SIZE:MICRO_BATCH, comma-separated (square, pixels)")
    parser.add_argument("--caption-len", type=int, default=128)
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                        help="the GPU target (docs/benchmarks.md#targets) is with activation checkpointing "
                             "(the default here)")
    parser.add_argument("--ac-every", type=int, default=1, help="checkpoint every n-th block only (selective)")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--per-module-gathers", dest="whole_blocks", action="store_false",
                        help="ZeRO-3 gathers per linear/norm (DeepSpeed's default) instead of per transformer block")
    parser.add_argument("--torch-adam", action="store_true",
                        help="torch AdamW instead of DeepSpeed's FusedAdam on CUDA (skips its JIT build)")
    parser.add_argument("--compile", action="store_true",
                        help="train.compile: torch.compile every block's forward (compile time is not timed)")
    parser.add_argument("--max-batch", type=int, default=0, help="CUDA: find the largest micro-batch ≤ N per bucket")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip the diffusers fwd+bwd row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    buckets = parse_buckets(args.sizes)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    ceiling = matmul_ceiling(device, compute_dtype)
    datasheet = next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)
    ours, peer, mcfg = build_pair(args.preset, device, torch.float32)
    params = sum(p.numel() for p in ours.parameters())
    checkpointing = f"every {args.ac_every} block(s)" if args.activation_checkpointing else "off"
    print(f"device: {name} | torch {torch.__version__} | preset {args.preset} ({params / 1e9:.3f} B params) | "
          f"{str(compute_dtype).removeprefix('torch.')} | ZeRO-{args.zero_stage} | activation checkpointing "
          f"{checkpointing} | matmul ceiling {ceiling / 1e12:.1f} TFLOP/s"
          + (f" (datasheet {datasheet / 1e12:.0f})" if datasheet else ""))

    def report(label: str, size: int, batch: int, ms: float, gib: float, extra: dict | None = None) -> dict:
        tokens = (size // pixels_per_token(mcfg.patch_size)) ** 2
        flops = train_flops(mcfg, tokens, caption_tokens(batch, args.caption_len)) * batch
        row = dict(bench="train", who=label, size=size, batch=batch, ms=ms, samples_per_s=batch / (ms / 1000),
                   tokens_per_s=batch * tokens / (ms / 1000), tflops=flops / (ms / 1000) / 1e12,
                   mfu_measured=flops / (ms / 1000) / ceiling,
                   mfu_datasheet=flops / (ms / 1000) / datasheet if datasheet else None, peak_gib=gib,
                   device=name, preset=args.preset, ceiling_tflops=ceiling / 1e12, **(extra or {}))
        print(f"{label:>28} {size}² × {batch:<3} {ms:9.1f} ms | {row['samples_per_s']:8.2f} samples/s | "
              f"{row['tokens_per_s']:10.0f} tokens/s | {row['tflops']:7.3g} TFLOP/s | MFU {row['mfu_measured']:.1%} "
              f"of measured ceiling | peak {gib:.1f} GiB")
        return row

    rows = time_peer(peer, mcfg, buckets, args, device, report) if args.peer else []
    del peer  # the peer and our engine never share the card
    if cuda:
        torch.cuda.empty_cache()

    # --- ours: the jobs.train step on a DeepSpeed engine -----------------------------------------------------------
    from jobs.training.loop import training_forward
    from jobs.training.parallelize import ShardedEMA, parallelize

    init_single_process_group(device)
    cfg = from_dict(TrainJobConfig, {
        "model": {"preset": args.preset}, "scaling": {"gpu": cuda},
        "train": {"activation_checkpointing": args.activation_checkpointing,
                  "activation_checkpointing_every": args.ac_every, "compile": args.compile},
        "deepspeed": {"zero_stage": args.zero_stage, "torch_adam": args.torch_adam,
                      "gather_whole_blocks": args.whole_blocks}})
    engine = parallelize(ours.train(), cfg, world=1)
    ema = ShardedEMA(engine.module, cfg.ema.decay)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    model_fn = training_forward(engine, dtype, cfg.train.proportional_attn)  # the model call of loop.loss_step

    def our_step_fn(size: int, batch: int, phases: dict[str, list[float]] | None = None):
        """One training step; with ``phases``, the wall time of each phase is appended there (synchronised)."""
        x1, t, noise, feats, mask = make_inputs(mcfg, size, batch, args.caption_len, device)

        def step():
            clock = PhaseClock(device, phases)
            loss, _ = flow_matching_loss(model_fn, x1, feats, mask, t=t, noise=noise)
            clock.lap("forward")
            engine.backward(loss)
            clock.lap("backward")
            engine.step()
            clock.lap("optimizer")
            ema.update()
            clock.lap("ema")
            return loss

        return step

    label = f"ours ZeRO-{args.zero_stage} step" + (" compiled" if args.compile else "")
    peaks = {}
    for size, batch in buckets:
        step = our_step_fn(size, batch)
        reset_peak(device)
        loss = float(step())
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"non-finite training loss {loss} at {size}² × {batch}")
        ms, _ = timed(step, device, args.warmup, args.repeats)
        peaks[size] = peak_gib(device)
        phases: dict[str, list[float]] = {}
        timed(our_step_fn(size, batch, phases), device, 0, args.repeats)  # separately: the laps synchronise
        breakdown = {name: statistics.median(times) for name, times in phases.items()}
        rows.append(report(label, size, batch, ms, peaks[size], {"loss": loss, "phases_ms": breakdown}))
        print(f"{'':>28} {size}² × {batch:<3} phases: "
              + " | ".join(f"{name} {value:.1f} ms" for name, value in breakdown.items()))
    # The searches come after every plain row: an out-of-memory error inside a ZeRO-3 step may leave the engine's
    # partitions half gathered, so nothing is measured after the first one.
    if args.max_batch and cuda:
        for size, batch in buckets:
            found, complete = find_max_batch(our_step_fn, report, label, size, batch, peaks[size], args, device)
            rows.extend(found)
            if not complete:
                break
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def time_peer(peer, mcfg, buckets, args, device, report) -> list[dict]:
    """The peer rows (docs/benchmarks.md#peer-on-one-h100): diffusers forward + backward, fp32 parameters under bf16
    autocast, no optimizer step."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    peer.train()
    rope_table = get_2d_rotary_pos_embed_lumina(mcfg.head_dim, 384, 384)
    kwargs = {"base_sequence_length": mcfg.base_tokens}
    rows = []
    for size, batch in buckets:
        x1, t, noise, feats, mask = make_inputs(mcfg, size, batch, args.caption_len, device)
        x_t = x1 * t[:, None, None, None] + noise * (1 - t[:, None, None, None])  # the flow convention (t=1: data)

        def step(x_t=x_t, t=t, feats=feats, mask=mask, target=x1 - noise):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                pred = peer(x_t, t, feats, mask, rope_table, cross_attention_kwargs=kwargs, return_dict=False)[0]
                loss = ((pred[:, : mcfg.in_channels].float() - target) ** 2).mean()
            loss.backward()
            peer.zero_grad(set_to_none=True)

        reset_peak(device)
        try:
            ms, _ = timed(step, device, args.warmup, args.repeats)
        except torch.cuda.OutOfMemoryError:  # the peer keeps every activation: report it, keep measuring ours
            peer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"{'diffusers fwd+bwd (peer)':>28} {size}² × {batch:<3} out of memory")
            continue
        rows.append(report("diffusers fwd+bwd (peer)", size, batch, ms, peak_gib(device)))
    return rows


def find_max_batch(step_fn, report, label, size, batch, gib, args, device) -> tuple[list[dict], bool]:
    """Largest micro-batch ≤ args.max_batch that fits: peak memory at ``batch`` and ``2·batch`` → a line → the card's
    memory (less 5% for the allocator's fragmentation), then that micro-batch is run and timed to confirm it.
    Returns the rows and whether the search ended without running out of memory."""
    rows = []
    double = min(2 * batch, args.max_batch)
    if double <= batch:
        return rows, True
    try:
        step = step_fn(size, double)
        reset_peak(device)
        ms, _ = timed(step, device, 1, args.repeats)
        gib2 = peak_gib(device)
        rows.append(report(label, size, double, ms, gib2))
        per_sample = max((gib2 - gib) / (double - batch), 1e-3)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 * 0.95
        predicted = min(args.max_batch, batch + int((total - gib) / per_sample))
        print(f"{'':>28} {size}²: {per_sample:.2f} GiB per sample over a fixed {gib - per_sample * batch:.1f} GiB → "
              f"largest micro-batch predicted {predicted}")
        if predicted > double:
            step = step_fn(size, predicted)
            reset_peak(device)
            ms, _ = timed(step, device, 1, args.repeats)
            rows.append(report(label, size, predicted, ms, peak_gib(device), {"largest_fitting": True}))
        else:
            rows[-1]["largest_fitting"] = True
    except torch.cuda.OutOfMemoryError as exc:
        print(f"{'':>28} {size}²: out of memory while searching ({str(exc).splitlines()[0]}); "
              "the last row printed is the largest micro-batch that fit; no further searches")
        torch.cuda.empty_cache()
        return rows, False
    return rows, True
