"""``python -m jobs.bench prepare``: images per CPU-second of ``jobs.prepare`` with the model stages off (decode + filter
+ bucket + shard) against img2dataset resizing and writing the same files (docs/benchmarks.md#curation-anchor).

img2dataset is never a project dependency: pass ``--img2dataset PATH`` to the ``img2dataset`` executable of a throwaway
venv (``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0``); without it only our side runs.
CPU-seconds are the user+system time of every process of a run (Ray's workers and daemons included), each side run as
a subprocess whose process tree is polled. Ray's start-up is timed separately (a run on an empty input) and subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.geometry import PIXELS_PER_TOKEN


def make_corpus(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct JPEGs of varied sizes (smooth random fields + noise, like crops of photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(300, 1200)), int(rng.integers(300, 1200))
        small = rng.integers(0, 255, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 8, (h, w, 3))
        arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command's whole process tree).

    Ray workers are not children the command waits for, so rusage would miss them: the tree is polled every 50 ms and
    each process's last seen user+system time is summed (at most ~50 ms of a process's very end goes uncounted).
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[int, float], float] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                t = p.cpu_times()
                seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, sum(seen.values())


def ours(corpus: Path, out: Path, size: int, per_shard: int, empty: Path) -> dict:
    """Our job in a fresh local Ray (one subprocess, so every Ray worker's CPU time is counted when Ray stops)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    common = ["--set", f"bucket.image.max_patches={(size // PIXELS_PER_TOKEN) ** 2}", "--set", "bucket.image.max_aspect=1.0",
              "--set", f"write.samples_per_shard={per_shard}", "--set", "read.modalities=[image]",
              "--set", "filter.dedup_perceptual=false", "--set", "progress=false", "--log-level", "WARNING"]
    shutil.rmtree(out, ignore_errors=True)
    start_wall, start_cpu = timed([sys.executable, "-m", "jobs.prepare", "--input", str(empty), "--output",
                                   str(out) + "-empty", *common], env)
    wall, cpu = timed([sys.executable, "-m", "jobs.prepare", "--input", str(corpus), "--output", str(out), *common],
                      env)
    stats = json.loads((out / "stats.json").read_text())
    return {"wall": wall, "cpu": cpu, "startup_wall": start_wall, "startup_cpu": start_cpu,
            "written": stats["run"]["written_samples"]}


def img2dataset(exe: str, corpus: Path, out: Path, size: int, per_shard: int) -> dict:
    listing = out.parent / "i2d-urls.txt"
    listing.write_text("".join(f"file://{p}\n" for p in sorted(corpus.glob("*.jpg"))))
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = timed([exe, "--url_list", str(listing), "--output_folder", str(out), "--image_size", str(size),
                       "--resize_mode", "center_crop", "--output_format", "webdataset", "--processes_count", "2",
                       "--thread_count", "16", "--number_sample_per_shard", str(per_shard), "--input_format", "txt"])
    written = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return {"wall": wall, "cpu": cpu, "written": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.bench prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="output side (img2dataset --image_size; our budget)")
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    corpus, empty = work / "corpus", work / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    if len(list(corpus.glob("*.jpg"))) != args.images:
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, args.images)
    mb = sum(p.stat().st_size for p in corpus.glob("*.jpg")) / 2**20
    print(f"corpus: {args.images} JPEGs, {mb:.0f} MB, output {args.size}px, {os.cpu_count()} cores")

    runs = {"ours": [], "img2dataset": []}
    for _ in range(args.repeats):
        runs["ours"].append(ours(corpus, work / "ours", args.size, args.per_shard, empty))
        if args.img2dataset:
            runs["img2dataset"].append(img2dataset(args.img2dataset, corpus, work / "i2d", args.size, args.per_shard))

    def report(name: str, rs: list[dict], startup: bool) -> None:
        if not rs:
            print(f"{name:<12} not run (pass --img2dataset PATH)")
            return
        for i, r in enumerate(rs):  # every run, so the spread behind the median is visible
            cpu = r["cpu"] - (r["startup_cpu"] if startup else 0)
            print(f"  {name} run {i + 1}: {r['wall']:.2f} s wall, {r['cpu']:.2f} CPU-s"
                  + (f" (start-up {r['startup_wall']:.2f} s wall, {r['startup_cpu']:.2f} CPU-s)" if startup else "")
                  + f" → {r['written'] / cpu:.1f} images/CPU-s")
        wall = statistics.median(r["wall"] - (r["startup_wall"] if startup else 0) for r in rs)
        cpu = statistics.median(r["cpu"] - (r["startup_cpu"] if startup else 0) for r in rs)
        written = rs[0]["written"]
        line = (f"{name:<12} {written:>6} images  {wall:6.2f} s wall  {cpu:6.2f} CPU-s  "
                f"{written / cpu:7.1f} images/CPU-s  {written / wall:7.1f} images/s")
        if startup:
            line += (f"  (Ray start-up excluded: {statistics.median(r['startup_wall'] for r in rs):.2f} s wall, "
                     f"{statistics.median(r['startup_cpu'] for r in rs):.2f} CPU-s)")
        print(line)

    report("jobs.prepare", runs["ours"], True)
    report("img2dataset", runs["img2dataset"], False)
    print("(lines without 'run': medians)")
    return 0
