"""Time-Aware Context Drop (paper §2.3; docs/design-decisions.md#time-aware-context-drop): fewer attention FLOPs, the
first round((1−t)·L) blocks pooled at each evaluation, off by default, a threshold on the token count, and a bounded
change of the samples of the trained toy (metric documented in docs/sampling.md)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import ContextDrop, preset
from models.sampler import GenerationRequest, Sampler, SamplerConfig
from models.text_encoder import TextEncoder
from tests.helpers import caption_batch, random_nextdit
from tests.tiny_models import make_tiny_text_encoder

LAYERS = 4


def attention_flops(model, x, t, feats, mask, drop):
    """FLOPs of the batched matmuls (the math backend's attention einsums) of one forward."""
    with FlopCounterMode(display=False) as counter:
        model(x, torch.full((x.shape[0],), t), feats, mask, context_drop=drop)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counts.get("aten.bmm", 0), counter.get_total_flops()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_fewer_attention_flops_by_exactly_the_pooled_keys(t):
    cfg = preset("tiny", n_layers=LAYERS, attention_backend="math")  # einsum attention: visible to the FLOP counter
    model = random_nextdit(cfg)
    x = torch.randn(2, 4, 16, 16)  # 8×8 = 64 tokens per sample
    feats, mask = caption_batch(2, 8, 32)
    with torch.no_grad():
        base, total_base = attention_flops(model, x, t, feats, mask, None)
        drop, total_drop = attention_flops(model, x, t, feats, mask, ContextDrop(0, kernel=2))
    pooled = round((1 - t) * LAYERS)
    b, n, heads, hd = 2, 64, cfg.n_heads, cfg.head_dim
    saved_per_block = 2 * (2 * b * heads * n * hd) * (n - n // 4)  # QKᵀ and AV with 75% fewer keys (2×2 windows)
    assert base - drop == pooled * saved_per_block
    assert total_base - total_drop == pooled * saved_per_block
    if pooled:
        assert drop < base


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    encoder = TextEncoder.from_pretrained(make_tiny_text_encoder(tmp_path_factory.mktemp("te")))
    model = random_nextdit(preset("tiny", n_layers=LAYERS))
    return Sampler(model, encoder, None, SamplerConfig(steps=3, solver="heun"))


def record_pooling(model):
    """Per forward: (t, [block indices whose self-attention got pooled keys/values])."""
    log, handles = [], []
    handles.append(model.register_forward_pre_hook(lambda mod, args: log.append((float(args[1][0]), []))))
    for i, block in enumerate(model.layers):
        def hook(mod, args, i=i):
            if args[6] is not None:  # Attention.forward(x, x_mask, rope, y, y_mask, self_scale, pool)
                log[-1][1].append(i)
        handles.append(block.attention.register_forward_pre_hook(hook))
    return log, lambda: [h.remove() for h in handles]


def test_right_blocks_pooled_at_each_evaluation(sampler):
    log, remove = record_pooling(sampler.model)
    try:
        (res,) = sampler.generate([GenerationRequest("a cat", width=128, height=128, seed=0, context_drop=True)])
    finally:
        remove()
    assert res.metadata["context_drop"] == {"min_tokens": 0, "kernel": 2}
    assert len(log) == res.metadata["nfe"] == 6
    for t, blocks in log:
        assert blocks == list(range(round((1 - t) * LAYERS))), t  # all blocks at noise, none at data
    assert log[0][1] == [0, 1, 2, 3] and log[-1][1] == []  # heun's last evaluation is at t = 1


def test_off_by_default_and_enabled_by_a_token_threshold(sampler, tmp_path):
    log, remove = record_pooling(sampler.model)
    try:
        sampler.generate([GenerationRequest("a cat", width=128, height=128, seed=0)])  # default: off
        assert all(blocks == [] for _, blocks in log)
        log.clear()
        threshold = Sampler(sampler.model, sampler.text_encoder, None,
                            SamplerConfig(steps=1, solver="euler", context_drop_min_tokens=100))
        threshold.generate([GenerationRequest("a cat", width=128, height=128, seed=0)])  # 64 tokens < 100
        assert log[0][1] == []
        log.clear()
        threshold.generate([GenerationRequest("a cat", width=256, height=128, seed=0)])  # 128 tokens ≥ 100
        assert log[0][1] == [0, 1, 2, 3]
    finally:
        remove()


# The documented metric (docs/sampling.md): relative RMSE between the final latents with and without Context Drop,
# ‖x_drop − x‖ / ‖x‖ over the toy's evaluation set (10 sigmoid-midpoint steps, CFG 4), set against the same ratio between
# different samples of the model. Measured: 0.42 (1×) and 0.44 (2×) against 1.42 / 1.41 between samples.
DROP_BOUND = 0.5
SAMPLE_FRACTION = 0.4


@pytest.mark.parametrize("scale", ["1x", "2x"])
def test_bounded_difference_on_the_trained_toy(scale):
    from tests import toy

    size = (16, 16) if scale == "1x" else (32, 32)
    metric = toy.context_drop_metric(size)
    assert metric["rel_rmse_drop"] < DROP_BOUND
    assert metric["rel_rmse_drop"] < SAMPLE_FRACTION * metric["rel_rmse_other_seed"]
