"""ODE solvers for the flow ODE dx/dt = v(x, t), integrated from t = 0 (noise) to t = 1 (data).

Paper §2.3 (docs/design-decisions.md#default-sampler): the flow ODE has no semi-linear structure, so classic explicit
Runge–Kutta methods apply directly on any time grid; Algorithm 1 is the midpoint method over the sigmoid schedule's grid.
Fixed-grid methods are ours (Euler, midpoint, Heun, RK4); ``dopri5`` is adaptive, through torchdiffeq (the official
sampler's library), and ignores the grid except for its end points.

The state is a tensor or a list of tensors (a list batch of different image sizes); every update is applied elementwise.
The velocity function is called as ``fn(x, t)`` with t a Python float shared by the whole batch. NFE counts calls of
``fn`` (one CFG evaluation — a [cond; uncond] forward — is one call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import torch

State = Union[torch.Tensor, list]
VelocityFn = Callable[[State, float], State]

FIXED_GRID_SOLVERS = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE_SOLVERS = ("dopri5",)
SOLVERS = FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return name


def nfe_for(solver: str, steps: int) -> int | None:
    """Function evaluations of a fixed-grid solve (None for adaptive solvers: known only afterwards)."""
    check_solver(solver)
    return EVALS_PER_STEP[solver] * steps if solver in EVALS_PER_STEP else None


def _axpy(x: State, terms: list[tuple[float, State]]) -> State:
    """x + Σ coef·v, for a tensor or a list of tensors."""
    if isinstance(x, torch.Tensor):
        out = x
        for coef, v in terms:
            out = out + coef * v
        return out
    return [_axpy(x_i, [(coef, v[i]) for coef, v in terms]) for i, x_i in enumerate(x)]


@dataclass
class SolveResult:
    x: State
    nfe: int
    times: list[float] = field(default_factory=list)  # every t the velocity was evaluated at, in call order


def solve(fn: VelocityFn, x0: State, grid: torch.Tensor | list[float], method: str = "midpoint",
          atol: float = 1e-6, rtol: float = 1e-3) -> SolveResult:
    """Integrate dx/dt = fn(x, t) over ``grid`` (t_0 → t_N) starting from x0."""
    check_solver(method)
    times = [float(t) for t in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    if len(times) < 2:
        raise ValueError("a solver grid needs at least two points")
    evaluated: list[float] = []

    def v(x, t):
        evaluated.append(t)
        return fn(x, t)

    if method == "dopri5":
        x = _dopri5(v, x0, times[0], times[-1], atol, rtol)
        return SolveResult(x, len(evaluated), evaluated)

    x = x0
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        if method == "euler":
            x = _axpy(x, [(h, v(x, t))])
        elif method == "midpoint":  # paper Algorithm 1: half an Euler step, then the full step with the midpoint slope
            k1 = v(x, t)
            k2 = v(_axpy(x, [(h / 2, k1)]), t + h / 2)
            x = _axpy(x, [(h, k2)])
        elif method == "heun":  # trapezoid with an Euler predictor
            k1 = v(x, t)
            k2 = v(_axpy(x, [(h, k1)]), t_next)
            x = _axpy(x, [(h / 2, k1), (h / 2, k2)])
        else:  # classic RK4
            k1 = v(x, t)
            k2 = v(_axpy(x, [(h / 2, k1)]), t + h / 2)
            k3 = v(_axpy(x, [(h / 2, k2)]), t + h / 2)
            k4 = v(_axpy(x, [(h, k3)]), t_next)
            x = _axpy(x, [(h / 6, k1), (h / 3, k2), (h / 3, k3), (h / 6, k4)])
    return SolveResult(x, len(evaluated), evaluated)


def _dopri5(v: VelocityFn, x0: State, t0: float, t1: float, atol: float, rtol: float) -> State:
    """Adaptive Dormand–Prince 5(4) via torchdiffeq; a list state travels as a tuple (torchdiffeq's tuple states)."""
    from torchdiffeq import odeint

    is_list = not isinstance(x0, torch.Tensor)
    y0 = tuple(x0) if is_list else x0
    ref = y0[0] if is_list else y0

    def func(t, y):
        out = v(list(y) if is_list else y, float(t))
        return tuple(out) if is_list else out

    span = torch.tensor([t0, t1], dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,
                        device=ref.device)
    ys = odeint(func, y0, span, method="dopri5", atol=atol, rtol=rtol)
    return [y[-1] for y in ys] if is_list else ys[-1]
