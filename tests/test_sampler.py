"""The Sampler: requests → images + metadata; validation; determinism per seed whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.sampler import CAPTION_PAD, GenerationRequest, Sampler, SamplerConfig
from models.schedules import ScheduleConfig
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    return make_tiny_model_folder(root / "model", make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae"),
                                  sampler={"steps": 3, "guidance": 3.0})


@pytest.fixture(scope="module")
def sampler(folder):
    return Sampler.from_pretrained(folder)


def req(prompt="a red cat", **kw):
    kw.setdefault("width", 48)
    kw.setdefault("height", 32)
    return GenerationRequest(prompt, **kw)


def test_from_pretrained_uses_folder_metadata_and_reports(sampler):
    assert sampler.config.steps == 3 and sampler.config.guidance == 3.0  # sampler defaults from the folder
    assert sampler.config.solver == "midpoint" and sampler.config.schedule.name == "sigmoid"
    (res,) = sampler.generate([req(seed=5)])
    assert res.image.shape == (32, 48, 3) and res.image.dtype == np.uint8
    assert res.latent.shape == (4, 4, 6)
    meta = res.metadata
    assert meta["seed"] == 5 and meta["nfe"] == 6 and meta["steps"] == 3 and meta["seconds"] > 0
    assert meta["solver"] == "midpoint" and meta["schedule"]["name"] == "sigmoid" and meta["cfg_channels"] == "all"
    assert "grid intervals" in meta["steps_meaning"]
    (unseeded,) = sampler.generate([req(seed=None)])
    assert isinstance(unseeded.metadata["seed"], int)  # a fresh seed is drawn and reported


def test_settings_merge_defaults_then_folder_then_caller_then_request(folder):
    """The one merge order (what serve's sampler section relies on): SamplerConfig defaults ← the folder's ← the
    caller's ← the request's fields."""
    s = Sampler.from_pretrained(folder, config={"steps": 5})
    assert s.config.steps == 5  # the caller's beats the folder's 3
    assert s.config.guidance == 3.0  # the folder's, not named by the caller, beats the default 4
    assert s.config.solver == "midpoint"  # named by neither: the default
    (plan,) = s.resolve([req(steps=7)])
    assert plan.steps == 7 and plan.guidance == 3.0  # the request's beats them all; unset fields keep the config's


def test_size_limits_are_the_samplers(folder):
    s = Sampler.from_pretrained(folder, config={"max_side": 64, "max_pixels": 64 * 48})
    s.resolve([req(width=64, height=48)])
    with pytest.raises(ValueError, match="exceeds the maximum of 64"):
        s.resolve([req(width=80, height=16)])
    with pytest.raises(ValueError, match="above the maximum of 3072"):
        s.resolve([req(width=64, height=64)])
    with pytest.raises(ValueError, match="width 0 must be a positive multiple"):  # 0 is not "use the default"
        s.resolve([req(width=0)])


def assert_same_image_to_rounding(image: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 8-bit rounding: float noise of ~1e-6 in the latent moves a pixel by one level at most, and only where
    its value lies next to a rounding boundary (rare)."""
    diff = np.abs(image.astype(np.int16) - expected.astype(np.int16))
    assert image.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), diff.mean())


def test_same_seed_same_image_whatever_the_batch(folder):
    """The promise of models/sampler.py ("Batching and determinism"): the kernels never depend on the batch-mates, so
    in the same slot of its solve a request's latent and image are bit-identical whatever the other slots hold; in
    another slot a BLAS may round its rows differently (MKL on 2 threads does: rows 4-5 of the 6-row per-sample
    matmuls of batch_size 3), so there the latent agrees to float rounding and the image to 8-bit rounding."""
    others = [req("a blue dog", seed=3), req("", seed=4, width=32), req("the big house on a hill by the sea", seed=9)]
    for batch_size in (1, 3):
        s = Sampler.from_pretrained(folder, config={"steps": 2, "batch_size": batch_size})
        (alone,) = s.generate([req(seed=11)])
        first = s.generate([req(seed=11), *others])  # slot 0, "a blue dog" (same caption length) in slot 1
        assert first[0].metadata["batch"] == min(2, batch_size) and first[0].metadata["slots"] == batch_size
        assert torch.equal(first[0].latent, alone.latent) and np.array_equal(first[0].image, alone.image)
        mixed = s.generate([others[0], others[1], req(seed=11), others[2]])  # slot 1 when batch_size > 1
        if batch_size == 1:  # one slot: the same position, the same kernels
            assert torch.equal(mixed[2].latent, alone.latent) and np.array_equal(mixed[2].image, alone.image)
        # the compiled-vs-eager tolerance below: far above fp32 rounding (7.7e-7 seen), far below any real change
        torch.testing.assert_close(mixed[2].latent, alone.latent, rtol=1e-4, atol=1e-5)
        assert_same_image_to_rounding(mixed[2].image, alone.image)
        assert mixed[1].image.shape == (32, 32, 3)
        assert not np.array_equal(mixed[0].image, alone.image)
    other = Sampler.from_pretrained(folder, config={"steps": 2}).generate([req(seed=12)])[0]
    assert not torch.equal(other.latent, alone.latent)


def test_attention_takes_one_path_whatever_the_batch_mates(folder, monkeypatch):
    """A prompt that fills its caption length (8 tokens) alone would leave the caption mask all-true, and attention
    would drop it (unmasked kernels: flash SDPA on CUDA) unless a batch-mate is shorter: every text solve pads
    CAPTION_PAD masked positions, so the same (masked) path runs whatever the other slots hold."""
    import models.nextdit

    calls = []
    original = models.nextdit.attention

    def spy(q, k, v, key_mask=None, scale=None, backend="auto"):
        calls.append((k.shape[1], key_mask is None))  # (keys, unmasked)
        return original(q, k, v, key_mask, scale, backend)

    monkeypatch.setattr(models.nextdit, "attention", spy)
    s = Sampler.from_pretrained(folder, config={"steps": 1, "solver": "euler", "batch_size": 2})
    full = "the big red cat on a hill"
    assert int(s.text_encoder.encode([full])[1].sum()) == 8 == s.text_encoder.encode([full])[1].shape[1]
    for guidance in (1.0, 3.0):  # g = 1: the conditional branch alone, nothing else padded
        paths = []
        for mates in ([], [req("a dog", seed=3, guidance=guidance)]):  # "a dog": 3 tokens, the same caption length
            calls.clear()
            paths.append((s.generate([req(full, seed=2, guidance=guidance), *mates])[0], list(calls)))
        (alone, alone_calls), (mixed, mixed_calls) = paths
        assert mixed.metadata["batch"] == 2 and alone_calls == mixed_calls  # the same calls, masked the same way
        cross = [unmasked for keys, unmasked in alone_calls if keys == 8 + CAPTION_PAD]
        assert cross and not any(cross), alone_calls  # every cross-attention call gets the caption mask
        assert torch.equal(alone.latent, mixed.latent) and np.array_equal(alone.image, mixed.image)  # slot 0 both times


def test_options_change_the_result(sampler):
    base = sampler.generate([req(seed=1, steps=2)])[0].latent
    official = sampler.generate([req(seed=1, steps=2, cfg_channels=3)])[0].latent
    assert not torch.equal(official, base)
    for change in (dict(solver="euler"), dict(schedule="rational"), dict(guidance=1.0, negative_prompt="a " * 30),
                   dict(schedule=ScheduleConfig("sigmoid", centre=0.3)), dict(negative_prompt="a dog")):
        assert not torch.equal(sampler.generate([req(seed=1, steps=2, **change)])[0].latent, base), change


def test_adaptive_solver_reports_nfe(sampler):
    (res,) = sampler.generate([req(seed=2, solver="dopri5")])
    assert res.metadata["solver"] == "dopri5" and res.metadata["nfe"] >= 6


@pytest.mark.parametrize("bad,match", [
    (dict(width=50), "multiple of 16"), (dict(height=8), "multiple of 16"), (dict(width=4096), "exceeds the maximum"),
    (dict(steps=0), "steps must be"), (dict(solver="leapfrog"), "unknown solver"),
    (dict(schedule="cosine"), "unknown schedule"), (dict(cfg_channels=9), "cfg_channels"),
    (dict(guidance=-1.0), "guidance"), (dict(class_label=1), "class_label 1 given, but the model is text-conditioned"),
])
def test_bad_requests_fail_clearly_before_work(sampler, bad, match):
    with pytest.raises(ValueError, match=match):
        sampler.generate([req(**bad)])


def test_bad_config_and_empty_requests(sampler):
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([])
    for bad in (dict(steps=0), dict(solver="x"), dict(batch_size=0), dict(cfg_channels=0)):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="unknown RoPE scaling mode"):
        from models.rope import RopeScaling

        sampler.generate([req(rope_scaling=RopeScaling(mode="yarn"))])


def test_compiled_sampler_gives_the_eager_image(folder):
    eager = Sampler.from_pretrained(folder).generate([req(seed=4)])[0]
    compiled = Sampler.from_pretrained(folder, config={"compile": True})
    assert compiled.forward is not compiled.model  # every solve goes through the compiled module
    result = compiled.generate([req(seed=4)])[0]
    torch.testing.assert_close(result.latent, eager.latent, rtol=1e-4, atol=1e-5)
