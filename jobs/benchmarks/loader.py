"""``python -m jobs.bench loader``: the samples/s the training loader (``jobs.training.data.BucketLoader``) delivers from
S3, and how much of its read time the background prefetch hides behind a training step.

Without ``--data`` it first writes a synthetic jobs.prepare output to a local S3 server (moto_server on 127.0.0.1, the
dev extra) with the prepare job's own ``ShardWriter``: ``--samples`` samples of one ``--side`` px bucket, each a fp16
latent (4, side/8, side/8) and fp16 text features (``--text-tokens`` × ``--text-width``, Gemma-2B's 2304 by default),
``--per-shard`` to a shard. With ``--data URI`` it reads an existing output instead (a real bucket: the AWS variables).

Then, in the same run:
1. **read**: the loader alone, on the training thread (``data.prefetch_steps=0``), no compute: samples/s and MB/s.
2. **step**: every step a stand-in for the training step that, like a GPU step, holds no GIL (a sleep of ``--step-ms``;
   default: the read time per step measured in 1, the case where reading costs as much as computing) — first with
   the reads on the training thread (the anchor), then with ``--prefetch`` steps read ahead. Printed: the wall time
   per step, the time the training thread waited for data per step, and the ratio of the two step rates.
The real step to hide behind is the training step's: docs/benchmarks.md#training-step-cpu (``--step-ms 265``: preset
small at 256² × 2 on 2 CPU cores); on a card, ``python -m jobs.bench train`` measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import uuid

import numpy as np

from jobs.benchmarks import platform_name
from jobs.training.data import BucketLoader, ShardCatalog
from models.geometry import latent_size

MODALITY = "image"


def write_synthetic(output: str, samples: int, per_shard: int, side: int, text_tokens: int, text_width: int,
                    micro_batch: int) -> None:
    """A jobs.prepare-shaped output of random latents and text features (shards, sidecars, manifest.parquet)."""
    from pipelines import constants as C
    from pipelines.manifest import OutputState
    from pipelines.writer import PackedSample, ShardWriter, npy_bytes, pack_sample

    rng = np.random.default_rng(0)
    shape = (4, *latent_size(side, side))  # an SD/SDXL-family VAE's 4 channels
    slot = f"{MODALITY}/{side}x{side}"
    info = {"member": C.LATENT_MEMBER, "shape": list(shape), "dtype": "float16", "micro_batch": micro_batch}
    writer = ShardWriter(output, {}, uuid.uuid4().hex[:8], per_shard, {})
    for i in range(samples):
        key = f"{i:016x}"
        meta = {"key": key, "member": C.LATENT_MEMBER, "modality": MODALITY, "shape": list(shape)}
        sample = pack_sample({
            "__key__": key, C.LATENT_MEMBER: npy_bytes(rng.standard_normal(shape, dtype=np.float32).astype(np.float16)),
            C.TEXT_FEATURES_MEMBER: npy_bytes(rng.standard_normal((text_tokens, text_width), np.float32)
                                              .astype(np.float16)),
            C.CAPTION_MEMBER: b"a synthetic sample", C.META_MEMBER: json.dumps(meta).encode()})
        record = {"key": key, "source": "synthetic", "sha256": "", "phash": 0}
        writer.add(slot, info, [PackedSample(sample, record, text=True)])
    writer.flush()
    OutputState(output).load().write_tables()


def run_epoch(catalog: ShardCatalog, grad_accum: int, prefetch: int, step_s: float, steps: int) -> dict:
    """``steps`` steps of one worker: the wall time, the time spent waiting in ``next()`` and the bytes delivered."""
    loader = BucketLoader(catalog, 0, 1, grad_accum, seed=0, prefetch=prefetch, until=steps)
    waits, delivered = [], 0
    start = time.perf_counter()
    try:
        for _ in range(steps):
            began = time.perf_counter()
            _, micro_batches = loader.next()
            waits.append(time.perf_counter() - began)
            delivered += sum(s["tensor"].nbytes + s["text_features"].nbytes for mb in micro_batches for s in mb)
            if step_s:
                time.sleep(step_s)
    finally:
        loader.close()
    return {"wall_s": time.perf_counter() - start, "wait_ms": 1000 * statistics.mean(waits), "bytes": delivered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="an existing jobs.prepare output (local or s3://); default: a synthetic one "
                                       "on a local S3 server")
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--side", type=int, default=1024, help="image side of the synthetic bucket (px)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--text-width", type=int, default=2304)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=2, help="data.prefetch_steps of the prefetched run")
    parser.add_argument("--step-ms", type=float, default=None,
                        help="the stand-in step (default: the read time per step measured alone)")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        source = args.data
        if source is None:
            from jobs.runtime import local_s3, new_bucket

            endpoint = stack.enter_context(local_s3())
            source = f"s3://{new_bucket(endpoint)}/prepared"
            began = time.perf_counter()
            write_synthetic(source, args.samples, args.per_shard, args.side, args.text_tokens, args.text_width,
                            args.micro_batch)
            print(f"wrote {args.samples} synthetic samples ({args.side}px latents + {args.text_tokens}×"
                  f"{args.text_width} text features) to {source} on the local S3 server {endpoint} in "
                  f"{time.perf_counter() - began:.1f} s")
        catalog = ShardCatalog.from_manifest(source, MODALITY, args.micro_batch)
        per_step = args.micro_batch * args.grad_accum
        steps = sum(s.samples for s in catalog.shards) // per_step
        if steps < 2:
            raise SystemExit(f"{source}: fewer than 2 steps of {per_step} samples")

        read = run_epoch(catalog, args.grad_accum, 0, 0.0, steps)
        samples = steps * per_step
        print(f"read (training thread, no compute): {samples / read['wall_s']:.1f} samples/s, "
              f"{read['bytes'] / read['wall_s'] / 2**20:.1f} MiB/s, {1000 * read['wall_s'] / steps:.1f} ms per step "
              f"of {per_step} samples ({len(catalog.shards)} shards, {steps} steps)")
        step_ms = args.step_ms if args.step_ms is not None else 1000 * read["wall_s"] / steps
        print(f"stand-in step: {step_ms:.1f} ms (GIL released, as a GPU step)")
        rows = [("reads on the training thread (anchor)", run_epoch(catalog, args.grad_accum, 0, step_ms / 1000, steps)),
                (f"prefetch {args.prefetch} steps", run_epoch(catalog, args.grad_accum, args.prefetch,
                                                              step_ms / 1000, steps))]
        print(f"{'loader':40s} {'ms/step':>8s} {'wait ms/step':>13s} {'samples/s':>10s}")
        for name, r in rows:
            print(f"{name:40s} {1000 * r['wall_s'] / steps:8.1f} {r['wait_ms']:13.1f} {samples / r['wall_s']:10.1f}")
        anchor, ours = rows[0][1], rows[1][1]
        print(f"prefetch / anchor step rate: {anchor['wall_s'] / ours['wall_s']:.2f}x; data wait "
              f"{ours['wait_ms']:.1f} ms of a {step_ms:.1f} ms step ({100 * ours['wait_ms'] / step_ms:.0f}%)")
        print(f"device: CPU loader thread ({platform_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
