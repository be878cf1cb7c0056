"""Next-DiT over audio latent frames (paper §5.2): the audio presets, 1D RoPE on the time axis, clips of any length."""

from __future__ import annotations

import pytest
import torch

from models import NextDiT, RopeScaling, preset
from models.config_io import ConfigError
from models.formats import CheckpointError, config_to_diffusers
from tests.helpers import caption_batch, random_nextdit


def clip(frames: int, seed: int) -> torch.Tensor:
    """A mel-VAE latent of ``frames`` latent frames, as the model takes it: (20 channels, 1 row, frames)."""
    return torch.randn(20, 1, frames, generator=torch.Generator().manual_seed(seed))


def test_audio_presets_are_one_row_of_frames_with_1d_rope():
    official = preset("audio")  # the official audio model's width and depth, as a Next-DiT
    assert (official.dim, official.n_layers, official.n_heads, official.head_dim) == (768, 16, 32, 24)
    assert official.ffn_hidden_dim == 2048 and official.cap_feat_dim == 1024
    for cfg in (official, preset("tiny-audio")):
        assert cfg.modality == "audio" and cfg.in_channels == 20 and cfg.patch_size == 1
        assert cfg.rope_axes == (0, 0, cfg.head_dim)  # every RoPE channel on the time axis
        assert cfg.out_channels == 20  # no learned variance
    with torch.device("meta"):
        params = sum(p.numel() for p in NextDiT(official).parameters())
    assert 150e6 < params < 250e6, params


def test_a_list_of_clips_of_different_lengths_equals_each_clip_alone():
    model = random_nextdit(preset("tiny-audio"))
    clips = [clip(32, 0), clip(13, 1), clip(47, 2)]  # shorter and longer than the 32 trained frames
    t = torch.tensor([0.2, 0.6, 0.95])
    feats, mask = caption_batch(3, 5, 32, [5, 3, 1])
    with torch.no_grad():
        together = model(clips, t, feats, mask)
        for b, latent in enumerate(clips):
            n = int(mask[b].sum())
            alone = model([latent], t[b: b + 1], feats[b: b + 1, :n], mask[b: b + 1, :n])
            assert together[b].shape == latent.shape
            torch.testing.assert_close(together[b], alone[0], rtol=1e-5, atol=1e-6)


def test_time_is_the_only_positional_axis():
    """1D RoPE: a token's rotation depends on its frame index alone, and the frames axis of the grid is unused."""
    model = preset("tiny-audio")
    rope = NextDiT(model).rope
    angles = rope.angles((1, 1, 6), t=1.0, scaling=None)
    assert angles.shape == (6, model.head_dim // 2)
    assert torch.all(angles[0] == 0) and torch.all(angles[1:] != 0)
    torch.testing.assert_close(angles[4], 4 * angles[1])  # linear in the frame index on every pair


def test_longer_clips_than_trained_extrapolate_only_beyond_the_trained_length():
    rope = NextDiT(preset("tiny-audio")).rope  # trained on 32 latent frames
    scaling = RopeScaling(mode="ntk")
    assert rope.scale_factors((1, 1, 32), scaling) == (1.0, 1.0, 1.0)
    assert rope.scale_factors((1, 1, 96), scaling) == (1.0, 1.0, 3.0)
    inside, beyond = (rope.angles((1, 1, n), t=1.0, scaling=scaling) for n in (32, 96))
    torch.testing.assert_close(inside, rope.angles((1, 1, 32), t=1.0, scaling=None))  # identity at the trained length
    assert not torch.allclose(beyond[:32], inside)  # scaled beyond it


def test_audio_configs_are_checked():
    with pytest.raises(ConfigError, match="unknown modality 'video'"):
        preset("tiny", modality="video")
    with pytest.raises(ConfigError, match="an audio model is text-conditioned"):
        preset("tiny-audio", conditioning="class")
    with pytest.raises(CheckpointError, match="diffusers"):  # diffusers' LuminaNextDiT2DModel is an image model
        config_to_diffusers(preset("tiny-audio"))
