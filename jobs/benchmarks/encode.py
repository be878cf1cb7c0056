"""``python -m jobs.bench encode``: images per second of ``jobs.prepare``'s VAE-encode stage (``pipelines.encode.
VaeEncode``, the very stage a run's actors hold) on bucket-sized images, per compute dtype: the figure a user sizes an
``encode.vae_resources`` GPU group by. The anchor is the same stage in float32, in the same run; each row prints its
ratio to it.

The VAE is random-initialised at its real shape (nothing is downloaded): the SDXL AutoencoderKL (128/256/512/512
channels, 2 layers per block; ``jobs.benchmarks.image.VAES``), written to a folder and loaded by the stage as a run
would. GPU: ``python -m jobs.bench encode --device cuda --size 1024 --batch 8``; CPU (CI-sized): the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from jobs.benchmarks import append_rows, platform_name
from jobs.benchmarks.image import VAES, build_vae


def encode_rate(folder: str, dtype: str, device: str, images: np.ndarray, warmup: int, repeats: int) -> dict:
    """Images per second of ``VaeEncode.process_rows`` on one batch, best and median of ``repeats`` timed calls."""
    from models.config_io import to_dict
    from pipelines import constants as C
    from pipelines.config import PrepareConfig
    from pipelines.encode import VaeEncode

    config = PrepareConfig()
    config.encode.vae, config.encode.vae_dtype = folder, dtype
    stage = VaeEncode(to_dict(config), device=device)

    def rows() -> list[dict]:
        return [{C.KEY: f"{i:016x}", C.PAYLOAD: image, C.META: {}} for i, image in enumerate(images)]

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        stage.process_rows(rows())
    times = []
    for _ in range(repeats):
        batch = rows()
        synchronize()
        start = time.perf_counter()
        stage.process_rows(batch)
        synchronize()
        times.append(time.perf_counter() - start)
    finite = all(np.isfinite(r[C.TENSOR]).all() for r in batch)  # float16 overflows in the SDXL VAE: say so
    return {"dtype": dtype, "images_per_s": len(images) / float(np.median(times)),
            "best_images_per_s": len(images) / min(times), "finite": bool(finite)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae", choices=list(VAES), default=None, help="default: sdxl on CUDA, tiny on CPU")
    parser.add_argument("--size", type=int, default=None, help="square bucket side (default: 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=8, help="images per call (the stage's batch_size)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; float32 (the anchor) always runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="append one JSON line per dtype to this file")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    vae, size = args.vae or ("sdxl" if cuda else "tiny"), args.size or (1024 if cuda else 64)
    dtypes = ["float32", *[d for d in args.dtypes.split(",") if d and d != "float32"]]
    device_name = torch.cuda.get_device_name(args.device) if cuda else f"CPU ({platform_name()})"
    print(f"device: {device_name}; VAE {vae}, {size}² images, batch {args.batch}")

    images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_vae(vae, torch.device("cpu")).save_pretrained(folder)
        for dtype in dtypes:
            rows.append(encode_rate(folder, dtype, args.device, images, args.warmup, args.repeats))
            if cuda:
                torch.cuda.empty_cache()
    anchor = rows[0]["images_per_s"]
    for row in rows:
        row.update(device=device_name, vae=vae, size=size, batch=args.batch, ratio=row["images_per_s"] / anchor)
        print(f"VaeEncode {row['dtype']:>9}: {row['images_per_s']:8.2f} images/s (best {row['best_images_per_s']:.2f})"
              f"  ×{row['ratio']:.2f} float32{'' if row['finite'] else '  NON-FINITE latents'}")
    append_rows(args.json, rows)
    return 0
