"""Time schedules: where on t ∈ [0, 1] (0 = noise, 1 = data) the ODE solver evaluates the velocity.

Paper §2.3 (the official rational shift: docs/official-formats.md#flow-matching-and-sampling; our sigmoid:
docs/design-decisions.md#sigmoid-schedule). A schedule is a monotone map f: [0, 1] → [0, 1] with f(0) = 0 and
f(1) = 1; a solver with ``steps`` intervals runs on the grid t_i = f(i / steps), i = 0 … steps. The paper's error
analysis finds the discretisation error of a flow model largest near noise and second largest near data, so good
schedules take small steps at both ends:

- ``uniform``: f(u) = u;
- ``rational``: the official time shift f(u) = u / (s − (s−1)·u), default s = 4 (small steps near noise; s = 1 is uniform);
- ``sigmoid``: two sigmoid pieces joined at the centre c, steepness ``a`` below and ``b`` above, each rescaled so the map
  is continuous at (c, c) and hits 0 and 1 exactly. Two orientations, because the paper's words and its error analysis
  point opposite ways: ``fine_ends`` takes small steps at both ends and coarse ones in the middle (where the error
  analysis puts the largest error: near noise, then near data); ``coarse_ends`` is its inverse map, large steps at the
  start and end and small ones in between (the paper's description of its sigmoid schedule, paper §2.3). a, b → 0 gives
  uniform in both. Orientation and constants come from a measured sweep on the model jobs.demo trains (docs/sampling.md).

Grid convention: ``steps`` is the number of solver intervals, so the grid has steps + 1 points. The official
``num_sampling_steps`` N counts grid points (N − 1 intervals): official N corresponds to our steps = N − 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("uniform", "rational", "sigmoid")
ORIENTATIONS = ("fine_ends", "coarse_ends")
OFFICIAL_SHIFT = 4.0  # infer yaml `t_shift: 4`, demo default (docs/official-formats.md#flow-matching-and-sampling)

# Measured defaults of the sigmoid schedule: the best (c, a, b, orientation) of the sweep in docs/sampling.md (5 and
# 10 midpoint steps against a 1000-NFE reference on the model jobs.demo trains): fine steps near noise over most of the
# range (c = 0.9), a linear last tenth. The error there is 0.22× uniform's and 0.45× the official shift-4 schedule's at
# 10 steps; the paper's "larger steps at both ends" orientation was never better than uniform.
SIGMOID_CENTRE = 0.9
SIGMOID_LOW = 4.0
SIGMOID_HIGH = 0.0
SIGMOID_ORIENTATION = "fine_ends"

_LINEAR_LIMIT = 1e-6  # steepness below which a sigmoid piece is evaluated as its linear limit (avoids 0/0)


class Schedule:
    """Base class: ``__call__`` maps u ∈ [0, 1] to t; ``grid(steps)`` gives the steps + 1 solver times (fp64)."""

    name = "schedule"

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, steps: int) -> torch.Tensor:
        if steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {steps}")
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        t = self(u)
        t[0], t[-1] = 0.0, 1.0  # exact end points whatever the rounding of the map
        return t

    def params(self) -> dict:
        return {}


@dataclass
class UniformSchedule(Schedule):
    name = "uniform"

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return u.to(torch.float64).clone()


@dataclass
class RationalSchedule(Schedule):
    """Official time shift t = u / (s − (s−1)·u) (= SD3's σ-shift in σ = 1 − t). s > 1 refines the noisy start."""

    shift: float = OFFICIAL_SHIFT
    name = "rational"

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"the rational schedule needs shift > 0, got {self.shift}")

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(torch.float64)
        return u / (self.shift - (self.shift - 1.0) * u)

    def params(self) -> dict:
        return {"shift": self.shift}


@dataclass
class SigmoidSchedule(Schedule):
    """Piecewise sigmoid (docs/design-decisions.md#sigmoid-schedule), ``fine_ends``:
    for u ≤ c, t = c·(σ(a(u−c)) − σ(−ac)) / (½ − σ(−ac)); for u ≥ c, t = c + (1−c)·(σ(b(u−c)) − ½) / (σ(b(1−c)) − ½).

    Each piece is convex (below c) or concave (above c), so the slope is smallest at u = 0 and u = 1: fine steps at
    both ends. ``coarse_ends`` is the inverse map (u and t swap roles), so its slope is largest at both ends: the
    paper's "larger steps at the start and end". a = b = 0 is the uniform schedule in both orientations.
    """

    centre: float = SIGMOID_CENTRE
    low: float = SIGMOID_LOW  # steepness a of the piece below the centre
    high: float = SIGMOID_HIGH  # steepness b of the piece above the centre
    orientation: str = SIGMOID_ORIENTATION
    name = "sigmoid"

    def __post_init__(self):
        if not 0.0 < self.centre < 1.0:
            raise ValueError(f"the sigmoid centre must lie in (0, 1), got {self.centre}")
        if self.low < 0 or self.high < 0:
            raise ValueError(f"sigmoid steepness must be ≥ 0, got a={self.low}, b={self.high}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"unknown sigmoid orientation {self.orientation!r}; "
                             f"choose one of {', '.join(ORIENTATIONS)}")

    @staticmethod
    def _piece(x: torch.Tensor, k: float, span: float) -> torch.Tensor:
        """(σ(k·x) − σ(0)) / (σ(k·span) − σ(0)) for x between 0 and ``span`` (span < 0 for the lower piece): 0 at the
        centre, 1 at the far end; the linear x/span when k → 0."""
        if k < _LINEAR_LIMIT:
            return x / span
        return (torch.sigmoid(k * x) - 0.5) / (1.0 / (1.0 + math.exp(-k * span)) - 0.5)

    @staticmethod
    def _piece_inverse(p: torch.Tensor, k: float, span: float) -> torch.Tensor:
        """The x in [0, span] whose ``_piece`` is p ∈ [0, 1]."""
        if k < _LINEAR_LIMIT:
            return p * span
        level = 0.5 + p * (1.0 / (1.0 + math.exp(-k * span)) - 0.5)
        return torch.logit(level.clamp(1e-300, 1 - 1e-16)) / k

    def _fine_ends(self, u: torch.Tensor) -> torch.Tensor:
        c = self.centre
        lower = c - c * self._piece(u - c, self.low, -c)  # c at u = c, 0 at u = 0
        upper = c + (1.0 - c) * self._piece(u - c, self.high, 1.0 - c)  # c at u = c, 1 at u = 1
        return torch.where(u <= c, lower, upper)

    def _coarse_ends(self, u: torch.Tensor) -> torch.Tensor:
        c = self.centre
        lower = c + self._piece_inverse(((c - u) / c).clamp(0, 1), self.low, -c)
        upper = c + self._piece_inverse(((u - c) / (1.0 - c)).clamp(0, 1), self.high, 1.0 - c)
        t = torch.where(u <= c, lower, upper)
        return torch.where(u <= 0, 0.0, torch.where(u >= 1, 1.0, t))  # the logit's rounding must not move the ends

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(torch.float64)
        return self._fine_ends(u) if self.orientation == "fine_ends" else self._coarse_ends(u)

    def params(self) -> dict:
        return {"centre": self.centre, "low": self.low, "high": self.high, "orientation": self.orientation}


@dataclass
class ScheduleConfig:
    """Typed config of a schedule (every parameter present; ``name`` picks the ones used)."""

    name: str = "sigmoid"
    shift: float = OFFICIAL_SHIFT  # rational
    centre: float = SIGMOID_CENTRE  # sigmoid c
    low: float = SIGMOID_LOW  # sigmoid a
    high: float = SIGMOID_HIGH  # sigmoid b
    orientation: str = SIGMOID_ORIENTATION  # sigmoid: fine_ends | coarse_ends

    def __post_init__(self):
        make_schedule(self)  # validate early: unknown names and bad parameters fail at config time

    def build(self) -> Schedule:
        return make_schedule(self)


def make_schedule(spec: str | ScheduleConfig | Schedule, **params) -> Schedule:
    """A schedule from a name (+ parameters), a :class:`ScheduleConfig` or a schedule (returned as is)."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, ScheduleConfig):
        name = spec.name
        params = {"shift": spec.shift, "centre": spec.centre, "low": spec.low, "high": spec.high,
                  "orientation": spec.orientation, **params}
    else:
        name = spec
    if name == "uniform":
        return UniformSchedule()
    if name == "rational":
        return RationalSchedule(params.get("shift", OFFICIAL_SHIFT))
    if name == "sigmoid":
        return SigmoidSchedule(params.get("centre", SIGMOID_CENTRE), params.get("low", SIGMOID_LOW),
                               params.get("high", SIGMOID_HIGH), params.get("orientation", SIGMOID_ORIENTATION))
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
