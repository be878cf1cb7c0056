"""``python -m jobs.bench schedules --model PATH``: which time schedule integrates a trained model best at few steps.

Every sigmoid setting of a grid (centre c, steepness a below and b above it, both orientations of models/schedules.py),
the official rational shift (s = 4) and uniform run the same prompts and seeds at each step count; the error is the
RMSE of the final latents against a converged reference solve of the same requests (RK4 on 250 uniform steps = 1000
NFE by default). The anchor is uniform at the same step count, in the same run: each row prints its error ratio to it.
Score = the geometric mean of a setting's errors over the step counts (docs/sampling.md has the table for the model
jobs.demo trains).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from models.schedules import ORIENTATIONS, ScheduleConfig


def latents(sampler, prompts: list[str], seeds: int, size: int, steps: int, solver: str,
            schedule: ScheduleConfig) -> torch.Tensor:
    from models.sampler import GenerationRequest

    requests = [GenerationRequest(p, width=size, height=size, seed=seed, steps=steps, solver=solver, schedule=schedule)
                for p in prompts for seed in range(seeds)]
    return torch.stack([r.latent for r in sampler.generate(requests)])


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.bench schedules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (with its text encoder and VAE references)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="the folder's EMA weights (what jobs.export writes and the demo serves); --no-ema: raw")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="solver steps to compare")
    parser.add_argument("--solver", default="midpoint")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--prompts", nargs="+", default=None, help="default: the demo's 12 prompts")
    parser.add_argument("--reference-steps", type=int, default=250, help="RK4 steps of the reference solve")
    parser.add_argument("--centres", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--steepness", type=float, nargs="+", default=[0.0, 3.0, 6.0, 9.0, 12.0],
                        help="steepness values for a and b (--lows / --highs set them apart)")
    parser.add_argument("--lows", type=float, nargs="+", help="steepness a below the centre (default: --steepness)")
    parser.add_argument("--highs", type=float, nargs="+", help="steepness b above the centre (default: --steepness)")
    parser.add_argument("--orientations", nargs="+", default=list(ORIENTATIONS), choices=ORIENTATIONS)
    parser.add_argument("--shifts", type=float, nargs="+", default=[4.0],
                        help="shifts of the rational schedule to compare (4: the official default)")
    parser.add_argument("--top", type=int, default=8, help="best sigmoid settings to print per orientation")
    parser.add_argument("--json", help="append every row as JSON lines to this file")
    args = parser.parse_args(argv)

    from models.sampler import Sampler

    if args.prompts is None:
        from jobs.demo import demo_prompts

        args.prompts = [p for p, _ in demo_prompts()]
    n = len(args.prompts) * args.seeds
    device = torch.device(args.device)
    sampler = Sampler.from_pretrained(args.model, ema=args.ema, config={"guidance": args.guidance, "batch_size": n},
                                      device=device)
    sampler.vae = None  # latents only: the metric never decodes
    began = time.perf_counter()
    ref = latents(sampler, args.prompts, args.seeds, args.size, args.reference_steps, "rk4", ScheduleConfig("uniform"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | {n} samples at {args.size}², CFG {args.guidance}, {args.solver}; reference RK4 × "
          f"{args.reference_steps} steps ({4 * args.reference_steps} NFE, {time.perf_counter() - began:.1f} s), "
          f"latent RMS {float(ref.pow(2).mean().sqrt()):.3f}")

    def errors(schedule: ScheduleConfig) -> list[float]:
        return [rmse(latents(sampler, args.prompts, args.seeds, args.size, s, args.solver, schedule), ref)
                for s in args.steps]

    def score(errs: list[float]) -> float:
        return math.exp(sum(math.log(e) for e in errs) / len(errs))

    anchor = errors(ScheduleConfig("uniform"))
    rows = [{"schedule": "uniform", "errors": anchor}]
    rows += [{"schedule": "rational", "shift": s, "errors": errors(ScheduleConfig("rational", shift=s))}
             for s in args.shifts]
    lows, highs = args.lows or args.steepness, args.highs or args.steepness
    for orientation, c, a, b in itertools.product(args.orientations, args.centres, lows, highs):
        if a == b == 0 and (orientation != args.orientations[0] or c != args.centres[0]):
            continue  # a = b = 0 is uniform whatever c and the orientation: measured once
        config = ScheduleConfig("sigmoid", centre=c, low=a, high=b, orientation=orientation)
        rows.append({"schedule": "sigmoid", "orientation": orientation, "centre": c, "low": a, "high": b,
                     "errors": errors(config)})
    for row in rows:
        row["score"] = score(row["errors"])
        row["vs_uniform"] = [e / u for e, u in zip(row["errors"], anchor)]

    header = " | ".join(f"RMSE {s} steps" for s in args.steps)
    print(f"{'schedule':<44} | {header} | score | ratio to uniform")

    def show(row):
        if row["schedule"] == "sigmoid":
            name = f"sigmoid {row['orientation']} c={row['centre']} a={row['low']} b={row['high']}"
        else:
            name = row["schedule"] + (f" s={row['shift']}" if "shift" in row else "")
        errs = " | ".join(f"{e:.4f}" for e in row["errors"])
        ratios = " / ".join(f"{r:.3f}" for r in row["vs_uniform"])
        print(f"{name:<44} | {errs} | {row['score']:.4f} | {ratios}")

    for row in rows[: 1 + len(args.shifts)]:
        show(row)
    for orientation in args.orientations:
        ranked = sorted((r for r in rows if r.get("orientation") == orientation), key=lambda r: r["score"])
        for row in ranked[: args.top]:
            show(row)
    best = min(rows, key=lambda r: r["score"])
    print("best:", {k: v for k, v in best.items() if k not in ("errors", "vs_uniform")})
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "model": args.model, "solver": args.solver, "steps": args.steps}) + "\n")
    return 0
