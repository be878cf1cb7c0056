"""On the toy Next-DiT trained in the suite (tests/toy.py): few-step sampling against a 400-NFE reference.

At equal NFE (10), the paper's recipe — midpoint on the sigmoid schedule (Algorithm 1) with the constants measured on
this toy (c = 0.5, a = 0, b = 3: its error is near data, unlike the demo model's, whose sweep set the library defaults)
— lands closer to the reference than Euler on the uniform grid (docs/sampling.md has the full tables).
"""

from __future__ import annotations

import pytest

from models.schedules import SigmoidSchedule
from tests import toy

TOY_SIGMOID = SigmoidSchedule(centre=0.5, low=0.0, high=3.0)  # the toy's sweep winner (docs/sampling.md)


@pytest.fixture(scope="module")
def model():
    return toy.trained_toy()


def test_toy_learned_the_flow(model):
    assert model.train_loss < 0.6  # the velocity target x1 − x0 has a mean square of ≈ 1.4 on this data


@pytest.mark.parametrize("guidance", [toy.GUIDANCE])  # guidance 1 is in docs/sampling.md (another reference solve)
def test_sigmoid_midpoint_beats_uniform_euler_at_equal_nfe(model, guidance):
    ref = toy.reference(guidance)
    euler, nfe_euler = toy.sample(model, "uniform", "euler", 10, guidance)
    midpoint, nfe_mid = toy.sample(model, TOY_SIGMOID, "midpoint", 5, guidance)
    assert nfe_euler == nfe_mid == 10
    err_euler, err_mid = toy.rmse(euler, ref), toy.rmse(midpoint, ref)
    assert err_mid < err_euler, f"sigmoid+midpoint {err_mid:.4f} vs uniform+euler {err_euler:.4f}"

