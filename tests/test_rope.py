"""RoPE properties (docs/official-formats.md#rope, docs/design-decisions.md#rope-scaling-modes): relative positions,
and every scaling mode's definition."""

from __future__ import annotations

import math

import pytest
import torch

from models.rope import NDRotaryEmbedding, RopeScaling, apply_rope, axis_frequencies, pair_axes

THETA = 10000.0


def test_official_pair_layout_interleaves_height_and_width():
    assert pair_axes((0, 8, 8)) == [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)]
    # unequal axes: round-robin until an axis runs out
    assert pair_axes((2, 4, 2)) == [(0, 0), (1, 0), (2, 0), (1, 1)]


def test_base_frequencies_match_official_formula():
    head_dim = 72
    rope = NDRotaryEmbedding(head_dim, (0, 36, 36))
    freqs = rope.frequencies((1, 8, 8), t=0.5, scaling=None)
    k = torch.arange(head_dim // 4, dtype=torch.float64)
    official = THETA ** (-4 * k / head_dim)  # ω_k = θ^(−4k/hd), shared by both axes
    assert torch.allclose(freqs[0::2], official) and torch.allclose(freqs[1::2], official)


def test_attention_logits_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = NDRotaryEmbedding(16, (0, 8, 8))
    q, k = torch.randn(16), torch.randn(16)

    def logit(pos_q, pos_k):
        grid = (1, 12, 12)
        angles = rope.angles(grid, 1.0, None)
        rotation = torch.polar(torch.ones_like(angles), angles)
        index = lambda p: p[0] * 12 + p[1]  # noqa: E731
        rq = apply_rope(q.view(1, 1, 1, 16), rotation[None, [index(pos_q)]])
        rk = apply_rope(k.view(1, 1, 1, 16), rotation[None, [index(pos_k)]])
        return float((rq * rk).sum())

    assert logit((0, 0), (2, 3)) == pytest.approx(logit((5, 4), (7, 7)), abs=1e-4)
    assert logit((1, 9), (4, 2)) == pytest.approx(logit((6, 10), (9, 3)), abs=1e-4)
    assert logit((0, 0), (2, 3)) != pytest.approx(logit((0, 0), (3, 2)), abs=1e-4)


@pytest.mark.parametrize("dim", [8, 36])
def test_pi_divides_every_frequency(dim):
    base = axis_frequencies(dim, THETA)
    assert torch.allclose(axis_frequencies(dim, THETA, 2.5, "pi"), base / 2.5)


@pytest.mark.parametrize("dim", [8, 36])
def test_ntk_keeps_the_highest_frequency_and_scales_the_lowest_by_s(dim):
    s = 3.0
    base, ntk = axis_frequencies(dim, THETA), axis_frequencies(dim, THETA, s, "ntk")
    assert ntk[0] == base[0] == 1.0
    # base θ·s^(d/(d−2)) makes the last (lowest) frequency exactly 1/s of its original
    assert ntk[-1] == pytest.approx(float(base[-1]) / s, rel=1e-9)
    assert torch.all(ntk <= base) and torch.all(ntk >= base / s - 1e-15)


def test_freq_aware_makes_dimension_k_star_exactly_pi():
    dim, s, trained_tokens = 36, 2.0, 64
    k_star = (dim / 2) * math.log(trained_tokens / (2 * math.pi), THETA)
    base_prime = THETA * s ** (dim / (2 * k_star))
    # evaluate the definition at the (fractional) k*: NTK branch equals PI exactly there
    assert base_prime ** (-2 * k_star / dim) == pytest.approx(THETA ** (-2 * k_star / dim) / s, rel=1e-12)
    freqs = axis_frequencies(dim, THETA, s, "freq_aware", trained_tokens=trained_tokens)
    base = axis_frequencies(dim, THETA)
    k = torch.arange(dim // 2, dtype=torch.float64)
    below, above = k < k_star, k > k_star
    assert torch.allclose(freqs[above], base[above] / s)  # low frequencies: interpolated
    assert torch.all(freqs[below] > base[below] / s)  # high frequencies: NTK keeps more detail
    assert torch.allclose(freqs[below], base[below] * s ** (-k[below] / k_star))


def test_time_aware_is_pi_at_noise_and_ntk_at_data():
    dim, s = 36, 2.0
    base = axis_frequencies(dim, THETA)
    at_noise = axis_frequencies(dim, THETA, s, "time_aware", t=0.0)
    assert at_noise[0] == 1.0 and torch.allclose(at_noise[1:], base[1:] / s)
    at_data = axis_frequencies(dim, THETA, s, "time_aware", t=1.0)
    ntk_base = THETA * s ** (2 * dim / (2 * dim + 1))  # ≈ θ·s
    k = torch.arange(dim // 2, dtype=torch.float64)
    assert torch.allclose(at_data, ntk_base ** (-2 * k / dim))
    # monotone in t: frequencies never shrink as t grows
    previous = at_noise
    for t in torch.linspace(0, 1, 11)[1:]:
        current = axis_frequencies(dim, THETA, s, "time_aware", t=float(t))
        assert torch.all(current >= previous - 1e-15)
        previous = current


def test_official_switch_is_pi_before_the_watershed_then_plain_theta_times_s():
    dim, s = 36, 2.0
    base = axis_frequencies(dim, THETA)
    k = torch.arange(dim // 2, dtype=torch.float64)
    assert torch.allclose(axis_frequencies(dim, THETA, s, "official_switch", t=0.29), base / s)
    assert torch.allclose(axis_frequencies(dim, THETA, s, "official_switch", t=0.31), (THETA * s) ** (-2 * k / dim))


@pytest.mark.parametrize("mode", ["none", "pi", "ntk", "freq_aware", "time_aware", "official_switch"])
def test_every_mode_is_identity_at_or_below_training_size(mode):
    rope = NDRotaryEmbedding(16, (0, 8, 8), trained_sides=(1, 8, 8), trained_area=64)
    plain = rope.frequencies((1, 8, 8), 0.5, None)
    for grid in [(1, 8, 8), (1, 4, 6)]:
        assert torch.equal(rope.frequencies(grid, 0.5, RopeScaling(mode=mode)), plain)


def test_per_axis_scaling_leaves_an_unscaled_axis_untouched():
    rope = NDRotaryEmbedding(16, (0, 8, 8), trained_sides=(1, 8, 8), trained_area=64)
    plain = rope.frequencies((1, 8, 8), 0.5, None)
    wide = rope.frequencies((1, 8, 16), 0.5, RopeScaling(mode="pi"))  # width doubled, height at training size
    assert torch.equal(wide[0::2], plain[0::2])  # height pairs
    assert torch.allclose(wide[1::2], plain[1::2] / 2)  # width pairs
    assert rope.scale_factors((1, 8, 16), RopeScaling(policy="area")) == (1.0, math.sqrt(2), math.sqrt(2))
    assert rope.scale_factors((1, 8, 16), RopeScaling(factors=(1.0, 3.0, 1.0))) == (1.0, 3.0, 1.0)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown RoPE scaling mode 'yarn'"):
        RopeScaling(mode="yarn")
