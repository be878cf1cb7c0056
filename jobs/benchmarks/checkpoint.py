"""``python -m jobs.bench checkpoint``: how long a checkpoint stalls training with the upload in the background
(``run.checkpoint_upload=async``, the default) against the step waiting for it (``sync``, the anchor), in one run.

It trains the same short run twice through the ``jobs.train`` driver (``jobs.training.driver.train``) on a local Ray
cluster: 2 Ray Train workers, ZeRO-3 on gloo, a checkpoint every ``--ckpt-every`` steps, every step logged
(``train.log_every=1``). Storage is a local S3 server (moto_server on 127.0.0.1, the dev extra) unless ``--storage``
names one (an ``s3://`` bucket: the AWS variables). The data is a small synthetic jobs.prepare output in a temporary
folder (the loader benchmark's writer), so that reading it costs next to nothing.

From each run's ``metrics.jsonl`` it takes every step's wall time (its samples over the ``samples_per_s`` of its
window: with ``log_every=1`` the window of the step after a checkpoint also holds the checkpoint's save and, in sync
mode, its upload) and prints per mode: the median ordinary step, the mean step that carries a checkpoint, its stall
over the median, the extra seconds per checkpoint over all the steps up to the next one (a background upload shares
the CPU with them), the fit's wall time and the checkpoint's size; then async / sync of each. Ray Train's report poll
is set to 0.25 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, as in the tests) so that the anchor does not also wait on it.
The default (preset ``small``: 4.3 M parameters, a 69 MB ZeRO-3 checkpoint with its optimizer state and EMA, 48 steps,
7 checkpoints followed by steps) takes about 1½ minutes on 2 cores (docs/benchmarks.md#checkpoint-upload-cpu-local-s3).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import uuid

MODES = ("sync", "async")  # the anchor first
MAX_STEPS = 500  # the run is bounded: a benchmark, not a training run


def step_seconds(history: list[dict]) -> dict[int, float]:
    """Each logged step's wall time: the samples of its window over the rate measured across that window."""
    times, seen = {}, 0
    for row in history:
        times[row["step"]] = (row["samples_seen"] - seen) / row["samples_per_s"]
        seen = row["samples_seen"]
    return times


def checkpoint_mb(run_dir: str) -> float:
    """Size of the run's newest complete checkpoint in storage (every rank's files), in MB."""
    from jobs.training.checkpointing import latest_checkpoint
    from models.storage import filesystem

    fs, path = filesystem(latest_checkpoint(run_dir))
    return sum(info["size"] for info in fs.find(path, detail=True).values()) / 1e6


def measure(mode: str, args, data: str, storage: str) -> dict:
    """Train the run once with ``run.checkpoint_upload=mode`` and summarise its step times."""
    from jobs.training.config import TrainJobConfig
    from jobs.training.driver import train
    from jobs.training.metrics import read_history
    from models.config_io import from_dict
    from models.storage import join

    name = f"bench-checkpoint-{mode}-{uuid.uuid4().hex[:6]}"  # a fresh run: the same name would resume
    cfg = from_dict(TrainJobConfig, {
        "data": {"uri": data}, "model": {"preset": args.preset},
        "train": {"steps": args.steps, "ckpt_every": args.ckpt_every, "log_every": 1},
        "scaling": {"workers": args.workers},
        # no restarts: a failure must end the measurement, not replay steps into it
        "run": {"storage": storage, "name": name, "checkpoint_upload": mode, "max_failures": 0},
        "logging": {"wandb": "disabled", "progress": False}})
    began = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - began
    run_dir = join(storage, name)
    times = step_seconds(read_history(run_dir))
    saved = list(range(args.ckpt_every, args.steps, args.ckpt_every))  # the checkpoints that have steps after them
    carrying = [s + 1 for s in saved]
    # step 1 also carries the first step's set-up, so it is left out
    median = statistics.median(t for s, t in times.items() if s > 1 and s not in carrying)
    carried = statistics.mean(times[s] for s in carrying)
    # A background upload also competes for the CPU (and the worker's GIL) with the steps after the one that carries
    # the checkpoint: what each checkpoint costs in all is the excess of every step up to the next checkpoint.
    extra = statistics.mean(sum(times[s] - median for s in range(c + 1, min(c + args.ckpt_every, args.steps) + 1))
                            for c in saved)
    return {"mode": mode, "run": run_dir, "median_s": median, "carry_s": carried, "stall_s": carried - median,
            "extra_s": extra, "checkpoints": len(saved), "wall_s": wall, "mb": checkpoint_mb(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="Next-DiT preset (its checkpoint is what is uploaded)")
    parser.add_argument("--steps", type=int, default=48, help=f"optimizer steps per run (at most {MAX_STEPS})")
    parser.add_argument("--ckpt-every", type=int, default=6, help="train.ckpt_every")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU, gloo)")
    parser.add_argument("--storage", metavar="URI", help="run storage (s3:// or local); default: a bucket on a local "
                                                         "S3 server")
    parser.add_argument("--side", type=int, default=128, help="image side of the synthetic bucket (px)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="synthetic samples (epochs repeat them)")
    args = parser.parse_args(argv)
    if not 1 <= args.ckpt_every < args.steps <= MAX_STEPS:
        parser.error(f"need 1 <= --ckpt-every < --steps <= {MAX_STEPS}: at least one checkpoint with a step after it")

    from jobs.benchmarks.loader import platform_name, write_synthetic
    from jobs.runtime import init_ray, local_s3, new_bucket

    # Ray Train's controller takes a worker's report at its poll (2 s by default), and a sync report whose predecessor
    # has not been taken waits for that poll (docs/training.md#metrics): poll often, so that the anchor's stall is its
    # upload. Set before the cluster starts: its workers inherit it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    with contextlib.ExitStack() as stack:
        storage = args.storage
        if storage is None:
            storage = f"s3://{new_bucket(stack.enter_context(local_s3()))}/runs"
        data = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ckpt-")), "prepared")
        write_synthetic(data, args.samples, args.samples, args.side, text_tokens=16, text_width=64,
                        micro_batch=args.micro_batch)
        init_ray()  # before the first fit, so that neither mode's wall time holds the cluster's start
        print(f"preset {args.preset}, {args.workers} workers, {args.steps} steps, a checkpoint every "
              f"{args.ckpt_every}, {args.side}px × {args.micro_batch} per worker; storage {storage}")
        rows = [measure(mode, args, data, storage) for mode in MODES]

    print(f"{'upload':14s} {'step (median)':>14s} {'ckpt step (mean)':>17s} {'stall/ckpt':>11s} "
          f"{'extra/ckpt':>11s} {'fit wall':>9s} {'checkpoint':>11s}")
    for r in rows:
        label = f"{r['mode']} (anchor)" if r["mode"] == "sync" else r["mode"]
        print(f"{label:14s} {1000 * r['median_s']:11.0f} ms {r['carry_s']:15.2f} s {r['stall_s']:+9.2f} s "
              f"{r['extra_s']:+9.2f} s {r['wall_s']:7.1f} s {r['mb']:8.1f} MB")
    sync, ours = rows
    print(f"async / sync: stall per checkpoint {ours['stall_s'] / sync['stall_s']:.2f}x, extra per checkpoint "
          f"{ours['extra_s'] / sync['extra_s']:.2f}x, fit wall {ours['wall_s'] / sync['wall_s']:.2f}x "
          f"({sync['checkpoints']} checkpoints with steps after them per run)")
    print(f"device: CPU ({platform_name()}), {args.workers} Ray Train workers on gloo")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
