"""``python -m jobs.bench points --model M``: how well a point-cloud model trained at one density samples others
(paper §5.3) — MMD-CD, COV-CD and 1-NNA-CD of generated clouds against reference clouds of the demo's built-in solids
at 1×, 4× and 8× the training density, with the time-aware scaled Fourier features against the anchor of the same
model and seeds with no scaling (``rope_scaling`` mode ``none``) and NTK scaling, in one run.

The model is a text-conditioned points model trained on the demo's solids (``./scripts/demo.sh`` exports one to
``out/demo/model-points``), prompted "a sphere", "a cube", "a cylinder". For each prompt, ``--clouds`` generated clouds
are compared with as many reference clouds of that solid, drawn afresh at the same density and placed on the unit sphere
as jobs.prepare places every cloud; the metrics pool the three solids (``models.point_metrics``). ``fidelity`` is the
share of generated clouds whose nearest solid (Chamfer distance to a dense reference) is the one the prompt names.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

MODES = ("time_aware", "none", "ntk")  # the first is ours; the rest are anchors of the same run


def reference_set(solid: str, clouds: int, points: int, seed: int) -> np.ndarray:
    """``clouds`` fresh clouds of ``points`` points on one solid, normalised as jobs.prepare normalises."""
    from jobs.demo_data import solid_points
    from pipelines.decode import normalise_unit_sphere

    rng = np.random.default_rng(seed)
    return np.stack([normalise_unit_sphere(solid_points(solid, points, rng)) for _ in range(clouds)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench points", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-conditioned points model folder (the demo's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--densities", default="1,4,8", help="multiples of the training density")
    parser.add_argument("--modes", default=",".join(MODES), help="Fourier-feature scaling modes to compare")
    parser.add_argument("--clouds", type=int, default=8, help="generated (and reference) clouds per solid")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.5, help="CFG scale (the demo's: above ~2 it pulls points "
                        "off the surface)")
    parser.add_argument("--json", help="append one JSON line per (density, mode) to this file")
    args = parser.parse_args(argv)

    from jobs.demo_data import SOLIDS, nearest_solid, reference_solids
    from models.point_metrics import chamfer_matrix, point_metrics
    from models.rope import RopeScaling
    from models.sampler import GenerationRequest, Sampler

    device = torch.device(args.device)
    sampler = Sampler.from_pretrained(args.model, device=device)
    cfg = sampler.model.config
    if cfg.modality != "points" or cfg.conditioning != "text":
        raise SystemExit(f"{args.model} is a {cfg.conditioning}-conditioned {cfg.modality} model; the benchmark "
                         "prompts a text-conditioned points model with the solids' names")
    trained = cfg.trained_sides[-1]
    modes = [m for m in args.modes.split(",") if m]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | {args.model}: trained on {trained} points | "
          f"{args.clouds} clouds per solid ({', '.join(SOLIDS)}) | {args.steps} steps, CFG {args.guidance}")
    dense = reference_solids()
    rows = []
    for multiple in (int(d) for d in args.densities.split(",")):
        points = trained * multiple
        reference = torch.from_numpy(np.concatenate(
            [reference_set(solid, args.clouds, points, seed=100 + i) for i, solid in enumerate(SOLIDS)]))
        within_reference = chamfer_matrix(reference, reference)  # shared by every mode's 1-NNA
        for mode in modes:
            began = time.perf_counter()
            requests = [GenerationRequest(f"a {solid}", seed=seed, points=points, steps=args.steps,
                                          guidance=args.guidance, rope_scaling=RopeScaling(mode=mode))
                        for solid in SOLIDS for seed in range(args.clouds)]
            clouds = [r.points for r in sampler.generate(requests)]
            seconds = time.perf_counter() - began
            hits = [nearest_solid(c, dense)[0] == solid
                    for c, solid in zip(clouds, [s for s in SOLIDS for _ in range(args.clouds)])]
            metrics = point_metrics(torch.from_numpy(np.stack(clouds)), reference, within_reference)
            rows.append(dict(bench="points", device=name, model=args.model, trained_points=trained, points=points,
                             density=multiple, mode=mode, clouds=len(clouds), steps=args.steps,
                             fidelity=float(np.mean(hits)), seconds=round(seconds, 2), **metrics))
            print(f"  {points} points, {mode}: generated in {seconds:.1f} s, scored", flush=True)
    print(f"{'density':>8} {'points':>7} {'mode':>11} {'MMD-CD':>9} {'COV-CD':>7} {'1-NNA':>6} {'fidelity':>8} "
          f"{'MMD / none':>10}")
    for row in rows:
        anchor = next((r for r in rows if r["points"] == row["points"] and r["mode"] == "none"), None)
        row["mmd_ratio_vs_none"] = row["mmd_cd"] / anchor["mmd_cd"] if anchor and anchor["mmd_cd"] > 0 else None
        ratio = f"{row['mmd_ratio_vs_none']:.3f}" if row["mmd_ratio_vs_none"] is not None else "-"
        print(f"{row['density']:>7}× {row['points']:>7} {row['mode']:>11} {row['mmd_cd']:>9.5f} "
              f"{row['cov_cd']:>7.0%} {row['1nna_cd']:>6.0%} {row['fidelity']:>8.0%} {ratio:>10}")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0
