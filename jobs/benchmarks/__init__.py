"""Benchmarks run by ``python -m jobs.bench NAME``."""

from __future__ import annotations

import argparse


def bench_parser(name: str, doc: str | None, preset: str = "small",
                 gpu_preset: str = "2B-GQA") -> argparse.ArgumentParser:
    """The parser every model benchmark starts from: ``--device`` (CUDA when present) and ``--preset``."""
    import torch

    parser = argparse.ArgumentParser(prog=f"python -m jobs.bench {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=preset, help=f"Next-DiT preset ({preset} on CPU, {gpu_preset} on a GPU)")
    return parser


def append_rows(path: str | None, rows: list[dict]) -> None:
    """Append each row as a JSON line to ``path`` (a benchmark's ``--json``); nothing without a path."""
    import json

    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def platform_name() -> str:
    """The CPU a benchmark ran on, as its report names it: the model from /proc/cpuinfo and the core count."""
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"
