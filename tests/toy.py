"""A toy conditional Next-DiT trained on the CPU inside the test suite, plus the measurements made on it.

Data: 4 classes of 4×16×16 "latents" (128-px images at the tiny preset's training size). Class k is a 2D grating with its
own orientation and frequency on every channel and a class-specific channel mix; each sample draws a random phase and
amplitude and a little pixel noise, so every class is a continuous family (a curved flow, not a point mass). Captions are
fixed random feature sequences per class (cap_feat_dim 32, class-dependent length); the empty caption is one token, used
for caption dropout (10%, the official rate) so CFG works.

The model is ``preset("tiny", n_layers=4)`` trained with ``models.flow.flow_matching_loss`` (uniform t) for a few hundred
AdamW steps (~20 s on 2 cores). ``trained_toy()`` is cached per process, so every test of a pytest session shares it.

``python -m tests.toy sweep`` runs the sigmoid-schedule sweep and the solver/schedule comparison recorded in
docs/sampling.md (``compare``: the comparison only); ``python -m tests.toy drop`` measures Context Drop on the toy.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import time

import torch

from models import ContextDrop, NextDiT, preset
from models.flow import FlowConfig, drop_caption_features, flow_matching_loss, make_schedule, solve, velocity_fn

N_CLASSES = 4
LATENT = (4, 16, 16)
CAPTION_LEN = 8
TRAIN_STEPS = 300
BATCH = 32
LR = 2e-3
GUIDANCE = 4.0
EVAL_SEEDS = 4  # samples per class in the evaluations
REFERENCE_SOLVER, REFERENCE_STEPS = "rk4", 100  # 400-NFE reference on a uniform grid (error < 1e-6, see docs)


@contextlib.contextmanager
def single_thread():
    """Run with one intra-op thread: on a shared 2-core machine a second OpenMP thread that spins while the other core is
    busy makes tiny-model work 10× slower, not 2× faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def toy_config():
    return preset("tiny", n_layers=3)


def class_captions(seed: int = 123) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feats (K, L, 32), mask (K, L)) per class, and the empty caption (1, 1, 32) / (1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(N_CLASSES, CAPTION_LEN, 32, generator=gen)
    mask = torch.zeros(N_CLASSES, CAPTION_LEN, dtype=torch.bool)
    for k in range(N_CLASSES):
        mask[k, : 3 + k] = True  # class-dependent caption length: exercises the masks
    feats = feats * mask[..., None]
    null = torch.randn(1, 1, 32, generator=gen)
    return feats, mask, null, torch.ones(1, 1, dtype=torch.bool)


def make_latents(labels: torch.Tensor, gen: torch.Generator, size: tuple[int, int] = LATENT[1:]) -> torch.Tensor:
    """Samples of the toy distribution for the given class labels, (B, 4, h, w)."""
    b = labels.shape[0]
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    angle = labels.float() * (math.pi / N_CLASSES)  # orientation per class
    freq = 1.5 + labels.float()  # frequency per class
    phase = torch.rand(b, generator=gen) * 2 * math.pi
    amp = 0.8 + 0.4 * torch.rand(b, generator=gen)
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    wave = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])  # (B, h, w)
    mix = torch.tensor([[1.0, 0.5, -0.5, 0.2], [0.3, 1.0, 0.4, -0.6], [-0.4, 0.2, 1.0, 0.5], [0.6, -0.3, 0.3, 1.0]])
    channels = mix[labels]  # (B, 4)
    x = amp[:, None, None, None] * channels[:, :, None, None] * wave[:, None]
    return x + 0.05 * torch.randn(x.shape, generator=gen)


@functools.lru_cache(maxsize=1)
def trained_toy(steps: int = TRAIN_STEPS, seed: int = 0) -> NextDiT:
    """The trained toy (eval mode, fp32). Cached: trained once per process."""
    with single_thread():
        return _train(steps, seed)


def _train(steps: int, seed: int) -> NextDiT:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = NextDiT(toy_config())
    feats, mask, null, null_mask = class_captions()
    flow = FlowConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20))
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, N_CLASSES, (BATCH,), generator=gen)
        x1 = make_latents(labels, gen)
        f, m = drop_caption_features(feats[labels], mask[labels], null, null_mask, flow.caption_dropout, gen)
        loss, _ = flow_matching_loss(model, x1, f, m, config=flow, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.train_loss = loss.item()
    return model.eval().requires_grad_(False)


def eval_batch(size: tuple[int, int] = LATENT[1:], seed: int = 1000):
    """(noise (K·S, 4, h, w), caption feats, mask, uncond feats, uncond mask) of the evaluation set."""
    feats, mask, null, null_mask = class_captions()
    labels = torch.arange(N_CLASSES).repeat_interleave(EVAL_SEEDS)
    noise = torch.stack([torch.randn(LATENT[0], *size, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(labels.shape[0])])
    length = feats.shape[1]
    uf = torch.nn.functional.pad(null, (0, 0, 0, length - 1)).expand(labels.shape[0], -1, -1)
    um = torch.nn.functional.pad(null_mask, (0, length - 1)).expand(labels.shape[0], -1)
    return noise, feats[labels], mask[labels], uf, um


def sample(model, schedule, solver: str, steps: int, guidance: float = GUIDANCE, size=LATENT[1:], **forward_kwargs):
    """Final latents and NFE of the evaluation set under one sampler setting."""
    noise, f, m, uf, um = eval_batch(size)
    fn = velocity_fn(model, f, m, uf, um, guidance=guidance, **forward_kwargs)
    with torch.inference_mode(), single_thread():
        out = solve(fn, noise, make_schedule(schedule).grid(steps), solver)
    return out.x, out.nfe


@functools.lru_cache(maxsize=8)
def reference(guidance: float = GUIDANCE, size: tuple[int, int] = LATENT[1:]) -> torch.Tensor:
    """The 400-NFE uniform-grid RK4 solution of the evaluation set (converged: docs/sampling.md)."""
    x, _ = sample(trained_toy(), "uniform", REFERENCE_SOLVER, REFERENCE_STEPS, guidance, size)
    return x


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------------------------
SWEEP_CENTRES = (0.3, 0.4, 0.5, 0.6, 0.7)
SWEEP_STEEPNESS = (0.0, 3.0, 6.0, 9.0, 12.0)


def sweep(steps=(5, 10), solver: str = "midpoint", guidance: float = GUIDANCE, centres=SWEEP_CENTRES,
          lows=SWEEP_STEEPNESS, highs=SWEEP_STEEPNESS):
    """Every (c, a, b) of the grid: RMSE to the reference at each step count. Score = geometric mean over step counts."""
    model, ref = trained_toy(), reference(guidance)
    rows = []
    for c, a, b in itertools.product(centres, lows, highs):
        schedule = make_schedule("sigmoid", centre=c, low=a, high=b)
        errors = [rmse(sample(model, schedule, solver, n, guidance)[0], ref) for n in steps]
        rows.append(((c, a, b), errors, math.exp(sum(math.log(e) for e in errors) / len(errors))))
    rows.sort(key=lambda r: r[2])
    return rows


def comparison(nfes=(10, 20), guidance: float = GUIDANCE, sigmoid=None):
    """RMSE to the reference of every schedule × fixed-grid solver at the given NFE budgets."""
    from models.solvers import EVALS_PER_STEP

    model, ref = trained_toy(), reference(guidance)
    schedules = {"uniform": make_schedule("uniform"), "rational (s=4)": make_schedule("rational", shift=4.0),
                 "sigmoid": sigmoid or make_schedule("sigmoid")}
    table = {}
    for (name, schedule), solver in itertools.product(schedules.items(), EVALS_PER_STEP):
        for nfe in nfes:
            if nfe % EVALS_PER_STEP[solver]:
                continue
            x, used = sample(model, schedule, solver, nfe // EVALS_PER_STEP[solver], guidance)
            table[(name, solver, used)] = rmse(x, ref)
    return table


def context_drop_metric(size=LATENT[1:], steps: int = 10):
    """Relative RMSE of Context Drop (2×2 K/V pooling, time-aware) against no drop, with the seed-to-seed scale."""
    model = trained_toy()
    base, _ = sample(model, "sigmoid", "midpoint", steps, size=size)
    drop, _ = sample(model, "sigmoid", "midpoint", steps, size=size, context_drop=ContextDrop(0, 2))
    other = base.roll(1, dims=0)  # each sample against its neighbour: mostly the same class, another seed
    norm = float(base.pow(2).mean().sqrt())
    return {"rel_rmse_drop": rmse(drop, base) / norm, "rel_rmse_other_seed": rmse(other, base) / norm}


def main(argv: list[str]) -> int:
    for what in argv or ["sweep"]:
        run(what)
    return 0


def run(what: str) -> None:
    began = time.perf_counter()
    model = trained_toy()
    print(f"trained toy in {time.perf_counter() - began:.1f} s ({time.process_time():.1f} CPU-s), "
          f"final loss {model.train_loss:.4f}", flush=True)
    if what == "refine":  # a finer grid around the coarse sweep's winner (0.5, 0, 3)
        rows = sweep(centres=(0.4, 0.5, 0.6), lows=(0.0, 1.0, 2.0), highs=(1.5, 3.0, 4.5))
        print("\n## refinement sweep, midpoint, guidance 4 — best 5 of", len(rows))
        for (c, a, b), errs, score in rows[:5]:
            print(f"| {c} | {a} | {b} | {errs[0]:.4f} | {errs[1]:.4f} | {score:.4f} |", flush=True)
    if what in ("sweep", "compare"):
        finer, _ = sample(model, "uniform", REFERENCE_SOLVER, 2 * REFERENCE_STEPS)
        print(f"reference check: RMSE(RK4 {REFERENCE_STEPS} steps, RK4 {2 * REFERENCE_STEPS} steps) = "
              f"{rmse(reference(), finer):.2e}; latent RMS {float(finer.pow(2).mean().sqrt()):.3f}", flush=True)
    if what == "sweep":
        for guidance in (GUIDANCE,):
            rows = sweep(guidance=guidance)
            print(f"\n## sigmoid sweep, midpoint, guidance {guidance} — best 10 of {len(rows)}")
            print("| c | a | b | RMSE 5 steps (10 NFE) | RMSE 10 steps (20 NFE) | geo-mean |")
            print("|---|---|---|---|---|---|")
            for (c, a, b), errs, score in rows[:10]:
                print(f"| {c} | {a} | {b} | {errs[0]:.4f} | {errs[1]:.4f} | {score:.4f} |", flush=True)
            uniform = next(r for r in rows if r[0][1] == 0.0 and r[0][2] == 0.0)
            print(f"| (uniform = a = b = 0) | | | {uniform[1][0]:.4f} | {uniform[1][1]:.4f} | {uniform[2]:.4f} |")
            (c, a, b), _, _ = rows[0]
            print(f"(sweep winner: c={c}, a={a}, b={b})", flush=True)
    if what in ("sweep", "compare"):
        for guidance in (GUIDANCE, 1.0):
            print(f"\n## comparison, guidance {guidance}, sigmoid = defaults of models/schedules.py")
            table = comparison(guidance=guidance)
            print("| schedule | solver | NFE | RMSE to reference |")
            print("|---|---|---|---|")
            for (name, solver, nfe), err in sorted(table.items(), key=lambda kv: (kv[0][2], kv[1])):
                print(f"| {name} | {solver} | {nfe} | {err:.4f} |", flush=True)
    elif what == "drop":
        for size in (LATENT[1:], (32, 32)):
            t0 = time.perf_counter()
            print(size, context_drop_metric(size), f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"total {time.perf_counter() - began:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
