"""``python -m jobs.bench build``: what building the model costs each training worker, partitioned (``deepspeed.zero_init``,
the default under ZeRO-3) beside the anchor in the same run: the whole model built on every worker and partitioned only
by ``deepspeed.initialize`` (``--set deepspeed.zero_init=false``).

It starts ``--workers`` processes joined in a gloo (CPU) or NCCL (CUDA, one GPU each) process group, as Ray Train's
workers are, and each builds the model exactly as ``jobs.train``'s workers do (``jobs.training.parallelize.build_model``,
seeded or from ``--init-from``). Per worker it prints the peak memory the build added (CPU: resident set; CUDA: the
caching allocator's peak) and the build time. On CPU the children run with a fixed malloc mmap threshold, so freed
blocks go back to the system and the resident set follows the live tensors, not glibc's retention (the figure without
it is higher for the partitioned build: docs/benchmarks.md).

CPU: ``python -m jobs.bench build --preset imagenet-600M --workers 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import time

import torch


def _worker(rank: int, world: int, port: int, settings: dict, partitioned: bool, results) -> None:
    """One worker: joins the group, builds the model, reports (rank, partitioned, parameters, peak GiB, seconds)."""
    import deepspeed

    from jobs.training.config import TrainJobConfig
    from jobs.training.parallelize import build_model
    from models.config_io import from_dict

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cuda = settings["scaling"]["gpu"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    deepspeed.init_distributed()
    cfg = from_dict(TrainJobConfig, settings)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model = build_model(cfg, device, world=world if partitioned else None)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    results.put((rank, partitioned, params, (peak - before) / 2**30, seconds))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(settings: dict, workers: int, partitioned: bool) -> list[tuple]:
    """Run one build on ``workers`` spawned processes; their reports sorted by rank."""
    import torch.multiprocessing as mp

    from jobs.benchmarks.train import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, workers, port, settings, partitioned, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    reports = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # the others would wait in a collective for ever
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a build worker failed (exit codes {[p.exitcode for p in procs]})") from None
    for p in procs:
        p.join(timeout=120)
    return sorted(reports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", default="imagenet-600M", help="model size preset")
    parser.add_argument("--init-from", help="a model folder to load (model.init_from) instead of the seeded init")
    parser.add_argument("--workers", type=int, default=2, help="processes (CUDA: one GPU each)")
    parser.add_argument("--json", help="append one JSON line per worker and build to this file")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2: one worker holds the whole model either way")
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < args.workers:
        parser.error(f"--workers {args.workers} needs as many GPUs; {torch.cuda.device_count()} visible")
    if not cuda:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # read by each child's glibc at start-up
    task = "class" if args.preset.startswith("imagenet") else "t2i"
    settings = {"model": {"preset": args.preset, "init_from": args.init_from}, "train": {"task": task},
                "scaling": {"gpu": cuda, "workers": args.workers}, "deepspeed": {"torch_adam": True}}
    where = (f"{args.workers} × {torch.cuda.get_device_name(0)}" if cuda
             else f"CPU, {args.workers} processes, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    print(f"device: {where} | torch {torch.__version__} | preset {args.preset}"
          + (f" from {args.init_from}" if args.init_from else " (seeded)"))
    peaks = {}
    for partitioned in (False, True):
        label = "partitioned (zero.Init)" if partitioned else "whole on each worker (anchor)"
        for rank, _, params, gib, seconds in measure(settings, args.workers, partitioned):
            print(f"  {label:32s} rank {rank}: {params / 1e6:.0f} M parameters, peak +{gib:.2f} GiB, "
                  f"build {seconds:.1f} s")
            peaks.setdefault(partitioned, []).append(gib)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"bench": "build", "device": where, "preset": args.preset, "rank": rank,
                                        "partitioned": partitioned, "params": params, "peak_gib": round(gib, 4),
                                        "seconds": round(seconds, 3)}) + "\n")
    if max(peaks[False]) > 0.01:  # a tiny model's build is lost in the resident set's page granularity
        print(f"largest per-worker peak, partitioned / whole: {max(peaks[True]) / max(peaks[False]):.2f} "
              f"(ideal 1/{args.workers} = {1 / args.workers:.2f})")
    return 0
