"""Resolution extrapolation at sampling time (paper §2.2, §3.1; docs/design-decisions.md#rope-scaling-modes).

Generating at 2× the training size runs in every RoPE mode, and the frequencies the model uses at every solver evaluation
are checked against each mode's definition, written out again here from docs/design-decisions.md#rope-scaling-modes
(independently of models/rope.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from models import preset
from models.rope import ROPE_MODES, RopeScaling
from models.sampler import GenerationRequest, Sampler, SamplerConfig
from models.text_encoder import TextEncoder
from tests.helpers import caption_batch, random_nextdit
from tests.tiny_models import make_tiny_text_encoder

THETA = 10000.0


def expected_axis(d: int, s: float, mode: str, t: float, train: int, watershed: float = 0.3) -> torch.Tensor:
    """docs/design-decisions.md#rope-scaling-modes, per axis with d real dims: ω_k = θ^(−2k/d), k = 0..d/2−1."""
    k = torch.arange(d // 2, dtype=torch.float64)
    w = THETA ** (-2 * k / d)
    if s == 1.0 or mode == "none":
        return w
    if mode == "pi":
        return w / s
    if mode == "ntk":
        return (THETA * s ** (d / (d - 2))) ** (-2 * k / d)
    if mode == "official_switch":
        return w / s if t < watershed else (THETA * s) ** (-2 * k / d)
    k_star = (d / 2) * math.log(train / (2 * math.pi)) / math.log(THETA) if mode == "freq_aware" else (2 * d * t + 1) / 4
    if k_star <= 0:
        return w / s
    base = THETA * s ** (d / (2 * k_star))
    return torch.maximum(w / s, base ** (-2 * k / d))


def expected_pairs(grid, t, mode, train=(1, 8, 8), head_dim=16, policy="per_axis"):
    """The official interleaved layout: pair j rotates with axis h for even j, w for odd j, frequency index j // 2."""
    d = head_dim // 2
    if policy == "area":
        s = max(1.0, math.sqrt(grid[1] * grid[2] / (train[1] * train[2])))
        sh = sw = s
    else:
        sh, sw = max(1.0, grid[1] / train[1]), max(1.0, grid[2] / train[2])
    fh, fw = expected_axis(d, sh, mode, t, train[1]), expected_axis(d, sw, mode, t, train[2])
    return torch.stack([fh[j // 2] if j % 2 == 0 else fw[j // 2] for j in range(head_dim // 2)])


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    encoder = TextEncoder.from_pretrained(make_tiny_text_encoder(tmp_path_factory.mktemp("te")))
    model = random_nextdit(preset("tiny", trained_sides=(1, 8, 8)))  # trained on square 8×8 tokens = 128 px only
    return Sampler(model, encoder, None, SamplerConfig(steps=2, solver="midpoint", guidance=2.0))


def record_frequencies(model):
    calls = []
    original = model.rope.frequencies

    def recording(grid, t, scaling):
        out = original(grid, t, scaling)
        calls.append((tuple(grid), float(t), scaling, out.clone()))
        return out

    model.rope.frequencies = recording
    return calls, lambda: setattr(model.rope, "frequencies", original)


@pytest.mark.parametrize("mode", ROPE_MODES)
def test_2x_generation_uses_each_modes_frequencies_at_every_evaluation(sampler, mode):
    calls, restore = record_frequencies(sampler.model)
    try:
        (res,) = sampler.generate([GenerationRequest("a cat", width=256, height=256, seed=0,
                                                     rope_scaling=RopeScaling(mode=mode))])
    finally:
        restore()
    assert res.latent.shape == (4, 32, 32) and torch.isfinite(res.latent).all()
    grid = make_grid = (1, 16, 16)
    times = sorted({t for _, t, _, _ in calls})
    sched = sampler.config.schedule.build().grid(2).tolist()
    expected_times = sorted({sched[0], (sched[0] + sched[1]) / 2, sched[1], (sched[1] + sched[2]) / 2})
    assert times == pytest.approx(expected_times)  # recomputed at every evaluation's own t (midpoint: 4 of them)
    for g, t, scaling, freqs in calls:
        assert g == make_grid and scaling.mode == mode
        assert torch.allclose(freqs, expected_pairs(grid, t, mode), rtol=1e-12, atol=0), (mode, t)
    if mode in ("time_aware", "official_switch"):  # time-dependent: the frequencies really change along the solve
        first = next(f for _, t, _, f in calls if t == times[0])
        last = next(f for _, t, _, f in calls if t == times[-1])
        assert not torch.equal(first, last)


def test_per_axis_factors_scale_only_the_long_axis_and_area_policy(sampler):
    calls, restore = record_frequencies(sampler.model)
    try:
        sampler.generate([GenerationRequest("a cat", width=256, height=128, seed=0, steps=1, solver="euler",
                                            rope_scaling=RopeScaling(mode="pi"))])
        sampler.generate([GenerationRequest("a cat", width=256, height=128, seed=0, steps=1, solver="euler",
                                            rope_scaling=RopeScaling(mode="pi", policy="area"))])
    finally:
        restore()
    per_axis, area = calls[0], calls[-1]
    assert per_axis[0] == (1, 8, 16)
    assert torch.allclose(per_axis[3], expected_pairs((1, 8, 16), 0.0, "pi"))
    assert torch.equal(per_axis[3][0::2], expected_axis(8, 1.0, "none", 0, 8))  # h: trained size, untouched
    assert torch.allclose(per_axis[3][1::2], expected_axis(8, 1.0, "none", 0, 8) / 2)  # w: 2× → PI by 2
    assert torch.allclose(area[3], expected_pairs((1, 8, 16), 0.0, "pi", policy="area"))


def test_explicit_factors_and_training_size_is_identity(sampler):
    model = sampler.model
    plain = model.rope.frequencies((1, 8, 8), 0.5, None)
    for mode in ROPE_MODES:
        assert torch.equal(model.rope.frequencies((1, 8, 8), 0.5, RopeScaling(mode=mode)), plain)
    forced = model.rope.frequencies((1, 8, 8), 0.5, RopeScaling(mode="pi", factors=(1.0, 3.0, 1.5)))
    assert torch.allclose(forced[0::2], plain[0::2] / 3) and torch.allclose(forced[1::2], plain[1::2] / 1.5)


def test_proportional_attention_scale_at_2x(sampler):
    cfg = sampler.model.config
    assert cfg.proportional_attn
    n = 16 * 16  # tokens at 2×; base = 64 at the training size
    expected = math.sqrt(math.log(n) / math.log(cfg.base_tokens) / cfg.head_dim)
    assert sampler.model.attention_scale([n], "cpu") == pytest.approx(expected)
    assert expected > 1 / math.sqrt(cfg.head_dim)  # sharper attention when extrapolating


# ---------------------------------------------------------------------------------------------------------------------
# What the model was trained on: aspect-ratio buckets within a token budget are trained shapes.
POLICIES = ("per_axis", "area")


def forward(model, latent, t, scaling):
    feats, mask = caption_batch(1, 8, model.config.cap_feat_dim, seed=2)
    with torch.no_grad():
        return model(latent, torch.tensor([t]), feats, mask, rope_scaling=scaling)


@pytest.fixture(scope="module")
def bucketed():
    """The tiny preset as the official recipe trains it: buckets up to 4:1 within its 64-token budget (no record: the
    official values, area 64 and 16 tokens per axis)."""
    model = random_nextdit(preset("tiny"))
    assert (model.config.rope_area, model.config.rope_sides) == (64, (1, 16, 16))
    return model


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", ROPE_MODES)
def test_every_trained_bucket_shape_is_identity_in_every_mode(bucketed, mode, policy):
    """A 4:1 bucket at the training token budget (16×4 tokens, either orientation) and the square one: RoPE is the
    identity at every t, so the forward equals mode "none" exactly."""
    for h, w in ((8, 32), (32, 8), (16, 16)):  # latents: 4×16, 16×4, 8×8 tokens
        latent = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(h))
        for t in (0.0, 0.5, 1.0):
            plain = forward(bucketed, latent, t, RopeScaling(mode="none"))
            scaled = forward(bucketed, latent, t, RopeScaling(mode=mode, policy=policy))
            assert torch.equal(scaled, plain), (h, w, t)


@pytest.mark.parametrize("mode", [m for m in ROPE_MODES if m != "none"])
def test_scaling_starts_beyond_the_trained_budget(bucketed, mode):
    rope = bucketed.rope
    assert rope.scale_factors((1, 4, 16), RopeScaling(mode=mode)) == (1.0, 1.0, 1.0)
    assert rope.scale_factors((1, 4, 20), RopeScaling(mode=mode)) == (1.0, 1.0, 20 / 16)  # past the longest side
    assert rope.scale_factors((1, 4, 16), RopeScaling(mode=mode, policy="area")) == (1.0, 1.0, 1.0)
    assert rope.scale_factors((1, 16, 16), RopeScaling(mode=mode, policy="area")) == (1.0, 2.0, 2.0)  # 4× the area
    latent = torch.randn(1, 4, 8, 40, generator=torch.Generator().manual_seed(0))  # 4×20 tokens: 80 > 64, 20 > 16
    for policy in POLICIES:
        plain = forward(bucketed, latent, 0.9, RopeScaling(mode="none"))
        scaled = forward(bucketed, latent, 0.9, RopeScaling(mode=mode, policy=policy))
        assert not torch.allclose(scaled, plain, atol=1e-6), policy


def test_official_and_diffusers_checkpoints_carry_the_official_training_shapes(tmp_path):
    """A released checkpoint (no record of its buckets) was trained at 1024 px with 4:1 crops: 4096 tokens, 128 per
    axis — so 2048×512 is a trained shape and 2048² is beyond the budget."""
    import argparse

    from safetensors.torch import save_file

    from models import NextDiT
    from models.checkpoint import read_config, write_checkpoint

    cfg = preset("tiny", train_grid=(1, 64, 64))  # a 1024-px model, tiny widths
    state = NextDiT(cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "consolidated.00-of-01.safetensors"))
    torch.save(argparse.Namespace(model="NextDiT_2B_GQA_patch2", image_size=1024, qk_norm=True),
               tmp_path / "model_args.pth")
    write_checkpoint(cfg, state, tmp_path / "diffusers", "diffusers")
    for path in (tmp_path, tmp_path / "diffusers"):
        read = read_config(str(path))
        assert (read.rope_area, read.rope_sides) == (4096, (1, 128, 128)), path
        rope = NextDiT.from_pretrained(str(path)).rope
        assert rope.scale_factors((1, 32, 128), RopeScaling()) == (1.0, 1.0, 1.0)  # 2048×512
        assert rope.scale_factors((1, 128, 128), RopeScaling(policy="area")) == (1.0, 2.0, 2.0)  # 2048²
