"""``python -m jobs.bench prepare``: images per CPU-second of ``jobs.prepare`` with the model stages off (decode + filter
+ bucket + shard) against img2dataset resizing and writing the same files (docs/benchmarks.md#curation).

img2dataset is never a project dependency: pass ``--img2dataset PATH`` to the ``img2dataset`` executable of a throwaway
venv (``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0 scikit-image==0.26.0``); without it
only our side runs. CPU-seconds are the user+system time of every process of a run (Ray's workers and daemons
included), each side run as a subprocess whose process tree is polled.

Start-up is what a job costs whatever its size: the cluster, the driver's imports, the run's actors, Ray Data's
per-job actors, its task workers' start and imports. It is measured as the same job on the first ``--startup-images``
images (32 per core, so that every task worker starts), and "start-up excluded" is the marginal rate
(N - n images) / (CPU(N) - CPU(n)): what each further image costs. A run on an empty input (the earlier definition)
starts no Ray Data execution, so it left Ray Data's per-job costs in the "excluded" figure. "Start-up included" is the
whole job's rate. ``--cluster running`` runs the jobs on one local cluster started for them all (after one warm-up job,
which creates Ray Data's per-cluster actors), counting what its processes spend during each job.

Two corpora (``--corpus``): ``generated`` (smooth random fields plus noise, 300-1200 px: hard to compress, so decoding
dominates) and ``photos`` (crops of the real photos scikit-image ships, rescaled to 64-1900 px a side, JPEG quality
75-95: what a web crawl looks like). ``--breakdown`` prints each run's CPU-seconds per process kind.
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

from jobs.benchmarks import platform_name
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


# the colour photos (and a few grey ones) scikit-image ships in skimage/data: the photo corpus is crops of these
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "rocket.jpg", "camera.png", "brick.png", "grass.png", "gravel.png")


def make_photo_corpus(folder: Path, n: int, photos: Path, seed: int = 0) -> list[Path]:
    """n JPEG crops of real photos, 64-1900 px a side: a random crop of a random photo with an aspect up to 3:1 (both
    tools keep those), rescaled so its long side is log-uniform in 64-1900 px, saved at a random quality in 75-95."""
    from PIL import Image

    missing = [name for name in PHOTOS if not (photos / name).exists()]
    if missing:
        raise SystemExit(f"{photos} lacks {', '.join(missing)}: pass --photos the skimage/data folder of a "
                         "scikit-image install (pip install scikit-image==0.26.0 into the img2dataset venv)")
    rng = np.random.default_rng(seed)
    sources = [Image.open(photos / name) for name in PHOTOS]
    sources = [im if im.mode in ("RGB", "L") else im.convert("RGB") for im in sources]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = sources[int(rng.integers(len(sources)))]
        w, h = photo.size
        long_side = float(np.exp(rng.uniform(np.log(64), np.log(1900))))
        aspect = float(rng.uniform(1.0, 3.0))
        out = (round(long_side), max(64, round(long_side / aspect)))
        out = out if rng.random() < 0.5 else out[::-1]  # landscape or portrait
        # the largest crop of that aspect that fits the photo, shrunk by a random factor, at a random place
        fit = min(w / out[0], h / out[1]) * float(rng.uniform(0.3, 1.0))
        cw, ch = max(1, round(out[0] * fit)), max(1, round(out[1] * fit))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize(out, Image.Resampling.LANCZOS)
        path = folder / f"{i:06d}.jpg"
        crop.save(path, quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths


def skimage_photos(img2dataset_exe: str | None) -> Path | None:
    """skimage/data of this interpreter, else of the img2dataset venv's (the documented throwaway venv)."""
    pythons = [sys.executable] + ([str(Path(img2dataset_exe).parent / "python")] if img2dataset_exe else [])
    for python in pythons:
        found = subprocess.run([python, "-c", "import os, skimage.data as d; print(os.path.dirname(d.__file__))"],
                               check=False, capture_output=True, text=True)
        if found.returncode == 0:
            return Path(found.stdout.strip())
    return None


def process_kind(cmdline: list[str]) -> str:
    """A process's kind for the breakdown: Ray's process title (``ray::…``), a daemon's executable, or the script."""
    if not cmdline:
        return "?"
    head = cmdline[0]
    if head.startswith("ray::"):
        return head.split(" ")[0]
    name = Path(head).name
    if name.startswith("python"):
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline else ""
        return f"python {module or Path(script).name}"
    return name


def timed(cmd: list[str], env: dict | None = None, breakdown: dict | None = None,
          cluster: RunningCluster | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command's whole process tree, plus what a running ``cluster``'s processes
    spent meanwhile); ``breakdown`` (if given) gets CPU seconds per ``process_kind``.

    Ray workers are not children the command waits for, so rusage would miss them: the trees are polled every 50 ms and
    each process's last seen user+system time is summed (at most ~50 ms of a process's very end goes uncounted); a
    cluster process that was already running counts from its CPU time when the command started.
    """
    import psutil

    baseline = {key: cpu for key, (cpu, _) in cluster.snapshot().items()} if cluster else {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[int, float], float] = {}
    kinds: dict[tuple[int, float], str] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                t, key = p.cpu_times(), (p.pid, p.create_time())
                seen[key] = t.user + t.system
                if breakdown is not None:  # a worker's title changes with its task: keep the last one seen
                    kind = process_kind(p.cmdline())
                    kinds[key] = kind if kind != "?" else kinds.get(key, kind)  # an exiting process has no cmdline
            except psutil.Error:
                pass
        for key, (cpu, kind) in (cluster.snapshot() if cluster else {}).items():
            seen[key] = cpu - baseline.get(key, 0.0)
            kinds[key] = kind if kind != "?" else kinds.get(key, kind)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    if breakdown is not None:
        for key, cpu in seen.items():
            breakdown[kinds.get(key, "?")] = breakdown.get(kinds.get(key, "?"), 0.0) + cpu
    return wall, sum(seen.values())


class RunningCluster:
    """A local Ray cluster started once (``ray start --head``) that consecutive jobs join through ``RAY_ADDRESS``: the
    "reuse a running cluster" way of running many small jobs. Its processes are found by its own temp dir (daemons)
    and as descendants of those (workers), and stopped by process id at the end (never ``ray stop``, which stops every
    Ray of the machine)."""

    def __init__(self, temp_dir: Path, num_cpus: int):
        from jobs.runtime import free_port

        self.temp_dir, port = temp_dir, free_port()
        self.address = f"127.0.0.1:{port}"
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                        f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))

    def processes(self) -> list:
        import psutil

        daemons = []
        for p in psutil.process_iter():
            try:
                if str(self.temp_dir) in " ".join(p.cmdline()):
                    daemons.append(p)
            except psutil.Error:
                pass
        found = {p.pid: p for p in daemons}
        for p in daemons:
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                pass
        return list(found.values())

    def snapshot(self) -> dict[tuple[int, float], tuple[float, str]]:
        """(pid, create time) → (CPU seconds so far, process kind) of every process of the cluster."""
        import psutil

        out = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = (t.user + t.system, process_kind(p.cmdline()))
            except psutil.Error:
                pass
        return out

    def stop(self) -> None:
        import psutil

        for _ in range(3):  # a daemon can outlive its workers by a moment, or start one while the others stop
            procs = self.processes()
            for p in procs:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            if not self.processes():
                return


def ours(corpus: Path, out: Path, size: int, per_shard: int, small: Path, breakdown: bool,
         cluster: RunningCluster | None = None) -> dict:
    """Our job in a fresh local Ray (one subprocess, so every Ray worker's CPU time is counted when Ray stops), or
    joining a running ``cluster`` (whose processes' CPU during the job is counted too)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    if cluster is not None:
        env["RAY_ADDRESS"] = cluster.address
    common = ["--set", f"bucket.image.max_patches={(size // PIXELS_PER_TOKEN) ** 2}", "--set", "bucket.image.max_aspect=1.0",
              "--set", f"write.samples_per_shard={per_shard}", "--set", "read.modalities=[image]",
              "--set", "filter.dedup_perceptual=false", "--set", "progress=false", "--log-level", "WARNING"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + "-startup", ignore_errors=True)
    start_wall, start_cpu = timed([sys.executable, "-m", "jobs.prepare", "--input", str(small), "--output",
                                   str(out) + "-startup", *common], env, None, cluster)
    start_written = json.loads((Path(str(out) + "-startup") / "stats.json").read_text())["run"]["written_samples"]
    kinds: dict[str, float] | None = {} if breakdown else None
    wall, cpu = timed([sys.executable, "-m", "jobs.prepare", "--input", str(corpus), "--output", str(out), *common],
                      env, kinds, cluster)
    stats = json.loads((out / "stats.json").read_text())
    return {"wall": wall, "cpu": cpu, "startup_wall": start_wall, "startup_cpu": start_cpu,
            "startup_written": start_written, "written": stats["run"]["written_samples"], "kinds": kinds}


def img2dataset(exe: str, corpus: Path, out: Path, size: int, per_shard: int, breakdown: bool) -> dict:
    listing = out.parent / "i2d-urls.txt"
    listing.write_text("".join(f"file://{p}\n" for p in sorted(corpus.glob("*.jpg"))))
    shutil.rmtree(out, ignore_errors=True)
    kinds: dict[str, float] | None = {} if breakdown else None
    wall, cpu = timed([exe, "--url_list", str(listing), "--output_folder", str(out), "--image_size", str(size),
                       "--resize_mode", "center_crop", "--output_format", "webdataset", "--processes_count", "2",
                       "--thread_count", "16", "--number_sample_per_shard", str(per_shard), "--input_format", "txt"],
                      None, kinds)
    written = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return {"wall": wall, "cpu": cpu, "written": written, "kinds": kinds}


def report(name: str, rs: list[dict], startup: bool | None) -> float | None:
    """Print every run and the medians; returns the median images per CPU-second. ``startup``: None for img2dataset,
    False / True for ours without (the marginal rate past the start-up run) / with start-up counted."""
    if not rs:
        print(f"{name:<28} not run (pass --img2dataset PATH)")
        return None

    def cost(r: dict, key: str) -> float:
        return r[key] - (r[f"startup_{key}"] if startup is False else 0.0)

    def images(r: dict) -> int:
        return r["written"] - (r["startup_written"] if startup is False else 0)

    for i, r in enumerate(rs):  # every run, so the spread behind the median is visible
        extra = (f" (start-up: {r['startup_written']} images in {r['startup_wall']:.2f} s wall, "
                 f"{r['startup_cpu']:.2f} CPU-s)" if startup is False else "")
        print(f"  {name} run {i + 1}: {images(r)} images, {cost(r, 'wall'):.2f} s wall, {cost(r, 'cpu'):.2f} "
              f"CPU-s{extra} → {images(r) / cost(r, 'cpu'):.1f} images/CPU-s")
    wall = statistics.median(cost(r, "wall") for r in rs)
    cpu = statistics.median(cost(r, "cpu") for r in rs)
    rate = statistics.median(images(r) / cost(r, "cpu") for r in rs)
    print(f"{name:<28} {images(rs[0]):>6} images  {wall:6.2f} s wall  {cpu:6.2f} CPU-s  {rate:7.1f} images/CPU-s")
    return rate


def print_breakdown(name: str, rs: list[dict]) -> None:
    kinds: dict[str, list[float]] = {}
    for r in rs:
        for kind, cpu in (r.get("kinds") or {}).items():
            kinds.setdefault(kind, []).append(cpu)
    if kinds:
        print(f"  {name}, CPU-s per process kind (median over runs, a kind missing from a run counts 0):")
        for kind, cpus in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
            cpus = cpus + [0.0] * (len(rs) - len(cpus))
            print(f"    {statistics.median(cpus):7.2f}  {kind}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.bench prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--corpus", default="generated,photos", help="comma-separated: generated, photos")
    parser.add_argument("--photos", default=None, help="the skimage/data folder the photo corpus is cut from "
                        "(default: found through this interpreter or the img2dataset venv's)")
    parser.add_argument("--size", type=int, default=256, help="output side (img2dataset --image_size; our budget)")
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    parser.add_argument("--startup-images", type=int, default=None,
                        help="the start-up run's images (default: 32 per core, so that every task worker starts in it "
                             "too)")
    parser.add_argument("--cluster", default="fresh", choices=["fresh", "running", "both"],
                        help="each job starts its own local Ray (fresh), or joins one started once for them all "
                             "(running: its processes' CPU during each job is counted)")
    parser.add_argument("--breakdown", action="store_true", help="CPU-seconds per process kind")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    print(f"device: {platform_name()}; output {args.size}px")
    for kind in args.corpus.split(","):
        corpus = work / f"corpus-{kind}"
        if len(list(corpus.glob("*.jpg"))) != args.images:
            shutil.rmtree(corpus, ignore_errors=True)
            if kind == "generated":
                make_corpus(corpus, args.images)
            elif kind == "photos":
                photos = Path(args.photos) if args.photos else skimage_photos(args.img2dataset)
                if photos is None:
                    raise SystemExit("no scikit-image found for the photo corpus: pass --photos DIR (its skimage/data)")
                make_photo_corpus(corpus, args.images, photos)
            else:
                raise SystemExit(f"unknown corpus {kind!r}: generated or photos")
        small = work / f"startup-{kind}"  # the first images of the corpus: the start-up run's input
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir(parents=True)
        for path in sorted(corpus.glob("*.jpg"))[: args.startup_images or 32 * (os.cpu_count() or 1)]:
            shutil.copy(path, small / path.name)
        mb = sum(p.stat().st_size for p in corpus.glob("*.jpg")) / 2**20
        print(f"\n== corpus {kind}: {args.images} JPEGs, {mb:.0f} MB")
        modes = ["fresh", "running"] if args.cluster == "both" else [args.cluster]
        runs: dict[str, list[dict]] = {mode: [] for mode in modes} | {"img2dataset": []}
        cluster = RunningCluster(work / "ray", os.cpu_count() or 1) if "running" in modes else None
        try:
            if cluster is not None:  # its first job also creates Ray Data's cluster-wide actors: once per cluster
                ours(small, work / "warm-up", args.size, args.per_shard, small, False, cluster)
            for _ in range(args.repeats):  # interleaved, so every side sees the same machine load
                for mode in modes:
                    runs[mode].append(ours(corpus, work / "ours", args.size, args.per_shard, small, args.breakdown,
                                           cluster if mode == "running" else None))
                if args.img2dataset:
                    runs["img2dataset"].append(img2dataset(args.img2dataset, corpus, work / "i2d", args.size,
                                                           args.per_shard, args.breakdown))
        finally:
            if cluster is not None:
                cluster.stop()
        anchor = report("img2dataset", runs["img2dataset"], None)
        for mode in modes:
            name = "jobs.prepare" + (", running cluster" if mode == "running" else "")
            without = report(f"{name} (start-up out)", runs[mode], False)
            with_startup = report(f"{name} (start-up in)", runs[mode], True)
            if args.breakdown:
                print_breakdown(name, runs[mode])
            if anchor:
                print(f"ratio (images/CPU-s, medians) {kind}, {mode} cluster: {without / anchor:.2f} with start-up "
                      f"excluded, {with_startup / anchor:.2f} included")
        if args.breakdown:
            print_breakdown("img2dataset", runs["img2dataset"])
    return 0
