"""``python -m jobs.bench adapters``: the memory of one sampler replica holding N LoRA variants of one base model, each
variant a merged copy of the model (how replicas held them before) against the N adapters unmerged on one shared base
(how they hold them now, models/lora.py), and the time of one model evaluation with an unmerged adapter active against
the same adapter merged.

Each way is measured in a fresh process (``--measure``), so that the growth of its resident memory is its own: what
the models add once built, after ``malloc_trim`` (CPU) or as ``torch.cuda.memory_allocated`` (GPU); beside it, the
bytes of the parameters it holds, each storage counted once. The model is a preset with random weights (``audio`` by
default: the official audio model's width and depth, 179 M parameters — a size a CPU measures in seconds); the
adapters have the LoRA training defaults (jobs/training/config.py ``LoRAConfig``: rank 16 on wq wk wv wo w1 w2 w3).

GPU: ``python -m jobs.bench adapters --device cuda`` (preset 2B-GQA, bf16).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

from jobs.benchmarks import bench_parser
from jobs.benchmarks.model import timed_pair
from jobs.training.config import LoRAConfig
from models import preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memory(device: torch.device) -> int:
    """Bytes this process holds now: resident memory on the CPU (freed heap returned first), allocated on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parameter_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage once (a shared base counts once)."""
    storages = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def build(args, seed: int = 0) -> torch.nn.Module:
    """The base model: the preset with random weights, in the benchmark's dtype, on its device."""
    from models.tiny import random_nextdit

    return random_nextdit(preset(args.preset), seed).to(args.device, DTYPES[args.dtype])


def inputs(args) -> tuple:
    """One CFG pair at the preset's training size, with a caption of --caption-len tokens (or a class label)."""
    cfg = preset(args.preset)
    gen = torch.Generator().manual_seed(0)
    shape = (2, cfg.in_channels, cfg.train_grid[1] * cfg.patch_size, cfg.train_grid[2] * cfg.patch_size)
    x = torch.randn(shape, generator=gen)
    if cfg.conditioning == "class":
        return (x.to(args.device, DTYPES[args.dtype]), torch.tensor([0.5, 0.5], device=args.device), None, None,
                torch.tensor([1, cfg.num_classes], device=args.device))
    feats = torch.randn(2, args.caption_len, cfg.cap_feat_dim, generator=gen)
    mask = torch.ones(2, args.caption_len, dtype=torch.bool)
    return tuple(v.to(args.device, DTYPES[args.dtype]) if v.is_floating_point() else v.to(args.device)
                 for v in (x, torch.tensor([0.5, 0.5]), feats, mask))


def measure(args) -> dict:
    """One way, in this (fresh) process: build the base and its N variants, then report the memory they hold. The
    shared way also times one evaluation with adapter 0 active against a merged copy of it."""
    import peft  # noqa: F401 - imported before the first measurement: the libraries are not the models' memory

    from models.lora import LoraAdapters, merge_adapter

    device = torch.device(args.device)
    folders = sorted(os.path.join(args.folder, name) for name in os.listdir(args.folder))
    before = memory(device)
    if args.measure == "merged":
        held = [merge_adapter(build(args), folder) for folder in folders]
    else:
        base = build(args)
        adapters = LoraAdapters(base)
        for i, folder in enumerate(folders):
            adapters.load(f"variant {i}", folder)
        held = [base]
    row = {"way": args.measure, "memory_growth": memory(device) - before, "parameter_bytes": parameter_bytes(held)}
    if args.measure == "shared":
        merged = merge_adapter(build(args), folders[0])
        batch = inputs(args)

        def evaluate(model):
            with torch.inference_mode():
                return model(*batch)

        with adapters.active("variant 0") as unmerged:  # held for the whole timing, as a solve holds it
            (row["unmerged_ms"], row["unmerged_min_ms"]), (row["merged_ms"], row["merged_min_ms"]) = timed_pair(
                [lambda: evaluate(unmerged), lambda: evaluate(merged)], device, args.warmup, args.repeats)
            a, b = evaluate(unmerged).float(), evaluate(merged).float()
        row["rel_diff"] = float((a - b).norm() / b.norm())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("adapters", __doc__, preset="audio")
    parser.set_defaults(preset=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA variants (a replica keeps 4 models loaded)")
    parser.add_argument("--rank", type=int, default=LoRAConfig.rank)
    parser.add_argument("--caption-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    parser.add_argument("--measure", choices=["merged", "shared"], help="(internal) measure one way in this process")
    parser.add_argument("--folder", help="(internal) the adapter folders")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("2B-GQA" if cuda else "audio")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.measure:
        print(json.dumps(measure(args)))
        return 0

    from models.tiny import make_lora_adapter

    lora = LoRAConfig(rank=args.rank, alpha=args.rank)  # alpha = rank: the training default's scale of 1
    with tempfile.TemporaryDirectory() as folder:
        base = build(args)
        params = sum(p.numel() for p in base.parameters())
        for i in range(args.adapters):  # B ≠ 0 (0.02 · randn): the adapters change the output
            make_lora_adapter(base, os.path.join(folder, f"{i:02d}"), seed=i + 1, target_modules=lora.target_modules,
                              rank=lora.rank, alpha=lora.alpha, std=0.02)
        del base
        rows = {}
        for way in ("merged", "shared"):  # each in a fresh process: its memory growth is its own
            command = [sys.executable, "-m", "jobs.bench", "adapters", "--measure", way, "--folder", folder,
                       *(argv or [])]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
    merged, shared = rows["merged"], rows["shared"]
    adapter_mb = (shared["parameter_bytes"] - merged["parameter_bytes"] / args.adapters) / args.adapters / 2**20
    name = (torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)")
    grown = "GPU memory allocated" if cuda else "RSS growth"
    print(f"device: {name} | torch {torch.__version__} | preset {args.preset} ({params / 1e6:.1f} M params) | "
          f"{args.dtype} | {args.adapters} LoRA variants, rank {lora.rank} on {' '.join(lora.target_modules)} "
          f"({adapter_mb:.1f} MiB each)")
    for label, row in (("merged copies (before)", merged), ("one shared base (now)", shared)):
        print(f"{label + ':':24} parameters {row['parameter_bytes'] / 2**30:.3f} GiB | {grown} "
              f"{row['memory_growth'] / 2**30:.3f} GiB")
    ratio_params = shared["parameter_bytes"] / merged["parameter_bytes"]
    ratio_memory = shared["memory_growth"] / merged["memory_growth"]
    print(f"ratio shared / merged: parameters {ratio_params:.3f} | {grown} {ratio_memory:.3f}")
    cfg = preset(args.preset)
    tokens = cfg.train_grid[1] * cfg.train_grid[2]
    step_ratio = shared["unmerged_ms"] / shared["merged_ms"]
    min_ratio = shared["unmerged_min_ms"] / shared["merged_min_ms"]  # the least disturbed by other load
    print(f"one evaluation (CFG pair, {tokens} tokens/sample): adapter unmerged {shared['unmerged_ms']:.1f} ms "
          f"(min {shared['unmerged_min_ms']:.1f}) | merged {shared['merged_ms']:.1f} ms (min "
          f"{shared['merged_min_ms']:.1f}) | ratio unmerged / merged {step_ratio:.3f} (of the minima "
          f"{min_ratio:.3f}) | rel. diff {shared['rel_diff']:.1e}")
    if args.json:
        with open(args.json, "a") as f:
            row = {"bench": "adapters", "device": name, "preset": args.preset, "dtype": args.dtype,
                   "adapters": args.adapters, "rank": lora.rank, "params": params, "merged": merged, "shared": shared,
                   "ratio_parameters": ratio_params, "ratio_memory": ratio_memory, "ratio_step": step_ratio,
                   "ratio_step_min": min_ratio}
            f.write(json.dumps(row) + "\n")
    return 0
