"""Flow-matching objective, t sampling, caption dropout and CFG (docs/official-formats.md#flow-matching-and-sampling;
docs/design-decisions.md#time-convention, docs/design-decisions.md#cfg-on-every-channel)."""

from __future__ import annotations

import pytest
import torch

from models import preset
from models.flow import (
    FlowConfig,
    apply_cfg,
    drop_caption_features,
    drop_captions,
    flow_matching_loss,
    interpolate,
    per_sample_loss,
    sample_t,
    velocity_fn,
    velocity_target,
)
from tests.helpers import caption_batch, random_nextdit


def test_interpolation_convention_t0_noise_t1_data():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    assert torch.equal(interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.25, 0.5, 0.9])
    xt = interpolate(x0, x1, t)
    assert torch.allclose(xt[1], 0.5 * (x0[1] + x1[1]))
    # the straight path's time derivative is the velocity target x1 − x0
    eps = 1e-3
    dx = (interpolate(x0, x1, t + eps) - interpolate(x0, x1, t - eps)) / (2 * eps)
    assert torch.allclose(dx, velocity_target(x0, x1), atol=1e-3)


def test_per_sample_loss_weighs_every_image_equally_in_list_batches():
    small, big = torch.ones(4, 2, 2), torch.ones(4, 8, 6)
    losses = per_sample_loss([small * 2, big * 3], [torch.zeros_like(small), torch.zeros_like(big)])
    assert losses.tolist() == [4.0, 9.0]  # a mean per image, not per pixel of the batch
    x = [torch.randn(4, 4, 4), torch.randn(4, 4, 8)]
    z = [torch.randn(4, 4, 4), torch.randn(4, 4, 8)]
    assert [a.shape for a in interpolate(z, x, torch.tensor([0.3, 0.7]))] == [a.shape for a in x]


def test_flow_matching_loss_is_mean_of_per_sample_mse_against_x1_minus_x0():
    model = random_nextdit(preset("tiny"))
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(2, 4, 16, 16, generator=gen)
    x0 = torch.randn(2, 4, 16, 16, generator=gen)
    feats, mask = caption_batch(2, 8, 32, valid=[3, 8])
    t = torch.tensor([0.2, 0.8])
    loss, losses = flow_matching_loss(model, x1, feats, mask, t=t, noise=x0)
    with torch.no_grad():
        pred = model(t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0, t, feats, mask)
    expected = ((pred - (x1 - x0)) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses, expected, atol=1e-6)
    assert torch.allclose(loss, expected.mean(), atol=1e-6)
    loss.backward()  # differentiable end to end
    assert model.final_layer.linear.weight.grad is not None


def test_t_sampling_distributions():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    uniform = sample_t(n, FlowConfig("uniform"), gen)
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    lognorm = sample_t(n, FlowConfig("lognorm"), gen)  # sigmoid(N(0,1)): median 0.5, mass away from the ends
    assert abs(float(lognorm.median()) - 0.5) < 0.01
    assert float(((lognorm < 0.05) | (lognorm > 0.95)).float().mean()) < 0.01
    shifted = sample_t(n, FlowConfig("shift", shift=3.0), gen)  # s > 1 pushes t toward the data end (official)
    u = torch.rand(n, generator=gen)
    assert abs(float(shifted.mean()) - float((3 * u / (1 + 2 * u)).mean())) < 0.01
    assert float(shifted.mean()) > 0.6
    with pytest.raises(ValueError, match="unknown t sampling"):
        FlowConfig("cosine")


def test_caption_dropout_rate_and_features():
    gen = torch.Generator().manual_seed(0)
    captions = drop_captions(["a cat"] * 20_000, 0.1, gen)
    assert abs(captions.count("") / 20_000 - 0.1) < 0.01
    assert set(captions) == {"", "a cat"}
    feats, mask = caption_batch(1000, 8, 4)
    null, null_mask = torch.full((1, 1, 4), 7.0), torch.ones(1, 1, dtype=torch.bool)
    out, out_mask = drop_caption_features(feats, mask, null, null_mask, 0.25, gen)
    dropped = out_mask.sum(1) == 1
    assert abs(float(dropped.float().mean()) - 0.25) < 0.05
    assert torch.all(out[dropped, 0] == 7.0) and torch.all(out_mask[dropped, 1:] == 0)
    assert torch.equal(out[~dropped], feats[~dropped])


def test_cfg_full_channel_default_and_official_three_channel_rule():
    v_c, v_u = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    full = apply_cfg(v_c, v_u, 4.0)
    assert torch.allclose(full, v_u + 4 * (v_c - v_u))
    official = apply_cfg(v_c, v_u, 4.0, channels=3)
    assert torch.allclose(official[:, :3], full[:, :3])
    assert torch.equal(official[:, 3], v_c[:, 3])  # channel 3 keeps the conditional prediction
    one = apply_cfg(v_c[0], v_u[0], 4.0, channels=3, channel_dim=0)
    assert torch.equal(one, official[0])


class Recorder(torch.nn.Module):
    """A fake model: records each call's batch and returns a velocity that depends on the caption."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, feats, mask, **kwargs):
        self.calls.append((x.shape[0] if torch.is_tensor(x) else len(x), t.clone(), feats.shape, kwargs))
        bias = (feats * mask[..., None]).sum((1, 2))
        if torch.is_tensor(x):
            return x * 0 + bias[:, None, None, None]
        return [xi * 0 + bias[i] for i, xi in enumerate(x)]


def test_velocity_fn_runs_cond_and_uncond_in_one_forward():
    model = Recorder()
    cond, cond_mask = torch.ones(2, 3, 1), torch.ones(2, 3, dtype=torch.bool)  # caption sum 3
    uncond, uncond_mask = torch.ones(2, 1, 1), torch.ones(2, 1, dtype=torch.bool)  # caption sum 1 (shorter: padded)
    fn = velocity_fn(model, cond, cond_mask, uncond, uncond_mask, guidance=4.0, rope_scaling="R", context_drop="D")
    v = fn(torch.zeros(2, 4, 2, 2), 0.25)
    assert len(model.calls) == 1
    batch, t, shape, kwargs = model.calls[0]
    assert batch == 4 and torch.all(t == 0.25) and shape == (4, 3, 1)
    assert kwargs == {"rope_scaling": "R", "context_drop": "D"}  # forwarded to every evaluation
    assert torch.allclose(v, torch.full_like(v, 1 + 4 * (3 - 1)))
    v_list = fn([torch.zeros(4, 2, 2), torch.zeros(4, 4, 2)], 0.5)  # a list batch of different sizes
    assert model.calls[-1][0] == 4 and [a.shape for a in v_list] == [(4, 2, 2), (4, 4, 2)]
    assert torch.allclose(v_list[1], torch.full((4, 4, 2), 9.0))
    unguided = velocity_fn(model, cond, cond_mask, uncond, uncond_mask, guidance=1.0)
    unguided(torch.zeros(2, 4, 2, 2), 0.0)
    assert model.calls[-1][0] == 2  # g = 1 needs no unconditional branch
