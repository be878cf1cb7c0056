"""Solver order on an analytic flow and schedule properties (paper §2.3; docs/design-decisions.md#sigmoid-schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.flow import SOLVERS, make_schedule, nfe_for, solve
from models.schedules import RationalSchedule, ScheduleConfig, SigmoidSchedule, UniformSchedule

# Gaussian → Gaussian: x0 ~ N(0, I), x1 ~ N(μ, σ²I). Along the linear path the marginal is N(tμ, s(t)²I) with
# s(t) = sqrt(t²σ² + (1−t)²), and the flow ODE dx/dt = μ + s'(t)/s(t)·(x − tμ) maps x0 to μ + σ·x0 exactly at t = 1.
MU, SIGMA = 1.5, 0.4


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    s = math.sqrt(t * t * SIGMA**2 + (1 - t) ** 2)
    ds = (t * SIGMA**2 - (1 - t)) / s
    return MU + ds / s * (x - t * MU)


def gaussian_exact(x0: torch.Tensor) -> torch.Tensor:
    return MU + SIGMA * x0


# The Gaussian flow is linear in x, and on it the midpoint rule superconverges (slope 3: the leading error term of this
# particular ODE integrates to zero). A nonlinear, time-dependent flow with a closed form shows the generic orders:
# dx/dt = (1 + cos 3t)·sqrt(1 + x²) has x(t) = sinh(asinh(x0) + t + sin(3t)/3).
def nonlinear_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    return (1 + math.cos(3 * t)) * torch.sqrt(1 + x * x)


def nonlinear_exact(x0: torch.Tensor) -> torch.Tensor:
    return torch.sinh(torch.asinh(x0) + 1 + math.sin(3) / 3)


def fitted_order(method: str, schedule: str, steps, flow: str = "nonlinear") -> float:
    velocity, exact = (nonlinear_velocity, nonlinear_exact) if flow == "nonlinear" else (gaussian_velocity,
                                                                                          gaussian_exact)
    x0 = 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in steps:
        grid = make_schedule(schedule).grid(n)
        errors.append(float((solve(velocity, x0, grid, method).x - exact(x0)).abs().max()))
    return float(np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0])


ORDERS = [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)]


@pytest.mark.parametrize("method,order", ORDERS)
def test_global_error_slope_matches_order_uniform_grid(method, order):
    slope = fitted_order(method, "uniform", (8, 16, 32, 64))
    assert abs(slope - order) < 0.2, f"{method}: fitted slope {slope:.3f}, expected {order}"


@pytest.mark.parametrize("schedule", ["sigmoid", "rational"])
@pytest.mark.parametrize("method,order", ORDERS)
def test_global_error_slope_on_mapped_grids(method, order, schedule):
    steps = (16, 32, 64, 128) if method != "rk4" else (8, 16, 32, 64)  # RK4 hits fp64 round-off sooner
    slope = fitted_order(method, schedule, steps)
    assert abs(slope - order) < 0.3, f"{method} on {schedule}: fitted slope {slope:.3f}, expected {order}"


@pytest.mark.parametrize("method,order", ORDERS)
def test_gaussian_to_gaussian_converges_at_least_at_order(method, order):
    slope = fitted_order(method, "uniform", (8, 16, 32, 64) if method != "rk4" else (4, 8, 16, 32), flow="gaussian")
    assert slope > order - 0.2, f"{method}: fitted slope {slope:.3f} on the Gaussian flow"
    if method == "midpoint":
        assert slope < 3.2  # superconvergent on this linear flow, see above


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_nfe_reported_and_evaluation_times(method):
    grid = make_schedule("sigmoid").grid(5)
    out = solve(gaussian_velocity, torch.zeros(3, dtype=torch.float64), grid, method)
    assert out.nfe == nfe_for(method, 5) == len(out.times)
    assert out.times[0] == 0.0 and all(0.0 <= t <= 1.0 for t in out.times)
    if method == "midpoint":  # Algorithm 1: t_i and the midpoint (t_i + t_{i+1})/2 of the schedule's grid
        expected = [v for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()) for v in (a, a + (b - a) / 2)]
        assert out.times == pytest.approx(expected)


def test_dopri5_adaptive_through_torchdiffeq():
    x0 = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = solve(gaussian_velocity, x0, [0.0, 1.0], "dopri5", atol=1e-9, rtol=1e-9)
    assert float((out.x - gaussian_exact(x0)).abs().max()) < 1e-6
    assert out.nfe > 6 and nfe_for("dopri5", 10) is None


def test_list_state_matches_tensor_state():
    x0 = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = make_schedule("rational").grid(6)
    for method in SOLVERS:
        as_tensor = solve(gaussian_velocity, x0, grid, method).x
        per_item = lambda xs, t: [gaussian_velocity(x, t) for x in xs]
        as_list = solve(per_item, [x0[0], x0[1]], grid, method).x
        # dopri5 picks its steps from the state's error norm, which torchdiffeq computes per tuple member
        tolerance = 1e-2 if method == "dopri5" else 1e-12
        assert torch.allclose(torch.stack(as_list), as_tensor, atol=tolerance)


def test_unknown_solver_and_schedule_raise():
    with pytest.raises(ValueError, match="unknown solver"):
        solve(gaussian_velocity, torch.zeros(1), [0.0, 1.0], "leapfrog")
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig(name="edm")
    with pytest.raises(ValueError, match="at least 1 step"):
        make_schedule("uniform").grid(0)


# ---------------------------------------------------------------------------------------------------------------------
SCHEDULE_CASES = [UniformSchedule(), RationalSchedule(4.0), RationalSchedule(0.5), SigmoidSchedule(),
                  SigmoidSchedule(0.3, 10.0, 2.0), SigmoidSchedule(0.7, 0.0, 12.0), SigmoidSchedule(0.5, 40.0, 40.0),
                  *(SigmoidSchedule(c, a, b, "coarse_ends") for c, a, b in
                    [(0.5, 3.0, 3.0), (0.3, 10.0, 2.0), (0.7, 0.0, 12.0), (0.5, 40.0, 40.0)])]


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=repr)
def test_schedule_monotone_with_exact_end_points(schedule):
    u = torch.linspace(0, 1, 2001, dtype=torch.float64)
    t = schedule(u)
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.0  # exact, not approximately
    assert bool((t[1:] > t[:-1]).all())
    for steps in (1, 5, 10, 37):
        grid = schedule.grid(steps)
        assert grid.shape == (steps + 1,) and grid[0] == 0.0 and grid[-1] == 1.0
        assert bool((grid[1:] > grid[:-1]).all())


def test_uniform_is_rational_with_shift_one_and_sigmoid_with_zero_steepness():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(RationalSchedule(1.0)(u), UniformSchedule()(u))
    assert torch.allclose(SigmoidSchedule(0.4, 0.0, 0.0)(u), u, atol=1e-12)
    assert torch.allclose(SigmoidSchedule(0.6, 1e-4, 1e-4)(u), u, atol=1e-4)  # continuous in the steepness


def test_coarse_ends_is_the_inverse_map_with_large_steps_at_both_ends():
    """The paper's wording (paper §2.3): larger steps at the start and end than in between — the inverse of
    fine_ends."""
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    fine, coarse = SigmoidSchedule(0.4, 8.0, 6.0), SigmoidSchedule(0.4, 8.0, 6.0, "coarse_ends")
    assert torch.allclose(coarse(fine(u)), u, atol=1e-9) and torch.allclose(fine(coarse(u)), u, atol=1e-9)
    steps = coarse.grid(10).diff()
    assert steps[0] > steps[4] and steps[-1] > steps[5]
    assert torch.allclose(SigmoidSchedule(0.4, 0.0, 0.0, "coarse_ends")(u), u, atol=1e-12)  # uniform at a = b = 0
    assert make_schedule(ScheduleConfig("sigmoid", orientation="coarse_ends")).orientation == "coarse_ends"
    with pytest.raises(ValueError, match="unknown sigmoid orientation"):
        ScheduleConfig("sigmoid", orientation="sideways")


def test_rational_is_the_official_time_shift():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 4.0
    assert torch.allclose(RationalSchedule(s)(u), u / (u + s - s * u))
    sigma = 1 - u  # the SD3 / diffusers shift in σ = 1 − t
    assert torch.allclose(1 - RationalSchedule(s)(u), s * sigma / (1 + (s - 1) * sigma))


def test_sigmoid_shape_fine_at_both_ends_continuous_at_centre():
    sched = SigmoidSchedule(0.4, 8.0, 6.0)
    grid = sched.grid(10)
    steps = grid.diff()
    assert steps[0] < steps[4] and steps[-1] < steps[5]  # small steps at noise and at data, coarse in the middle
    c = torch.tensor([0.4 - 1e-9, 0.4, 0.4 + 1e-9], dtype=torch.float64)
    assert torch.allclose(sched(c), torch.full((3,), 0.4, dtype=torch.float64), atol=1e-7)
    with pytest.raises(ValueError):
        SigmoidSchedule(1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        SigmoidSchedule(0.5, -1.0, 1.0)
