"""The mel front end (models/mel.py) and the mel VAE with its training losses (models/audio_vae.py,
models/audio_vae_losses.py), paper §5.2: tiny random models on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.audio_vae import AUDIO_VAE_FORMAT, AudioVAE, AudioVAEConfig, read_audio_vae_config
from models.audio_vae_losses import (
    AudioVAELossConfig,
    DiscriminatorConfig,
    MultiWindowDiscriminator,
    discriminator_loss,
    vae_loss,
)
from models.checkpoint import CONFIG_FILE
from models.config_io import ConfigError, from_dict, to_dict
from models.formats import CheckpointError
from models.mel import MelConfig, frames_for, griffin_lim, log_mel, samples_for


def tone(freq: float, seconds: float, rate: int = 16_000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * freq * t)


def tiny(**overrides) -> AudioVAE:
    torch.manual_seed(0)
    return AudioVAE(from_dict(AudioVAEConfig, {"preset": "tiny", **overrides}))


# ---- log-mel features ------------------------------------------------------------------------------------------------
def test_frame_arithmetic_and_the_shard_sample_rate():
    from pipelines import constants as C

    cfg = MelConfig()
    assert (cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.f_min, cfg.f_max, cfg.log_floor) == (
        16_000, 1024, 256, 80, 0.0, 8_000.0, 1e-5)
    assert C.SAMPLE_RATE == cfg.sample_rate
    assert frames_for(160_000) == 626 and frames_for(255) == 1 and frames_for(256) == 2
    for frames in (1, 2, 313, 624):
        assert frames_for(samples_for(frames)) == frames
    with pytest.raises(ConfigError, match="f_max"):
        MelConfig(f_max=9_000.0)


def test_log_mel_is_the_torchaudio_definition_and_the_pipelines_features():
    import torchaudio.transforms as T

    from pipelines.encode import log_mel as pipeline_log_mel

    wave = torch.randn(2, 12_345, generator=torch.Generator().manual_seed(0)) * 0.1
    ours = log_mel(wave)
    assert ours.shape == (2, 80, frames_for(12_345)) and ours.dtype == torch.float32
    # the definition the shards were written with before models/mel.py (docs/design-decisions.md#log-mel-features)
    reference = torch.log(torch.clamp(T.MelSpectrogram(
        sample_rate=16_000, n_fft=1024, hop_length=256, n_mels=80, f_min=0.0, f_max=8_000.0, power=1.0,
        norm="slaney", mel_scale="slaney", center=True)(wave), min=1e-5))
    # the same operations in the same order; compared to float tolerance, not bits, so no CPU kernel choice matters
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for clip, features in zip(wave, ours):  # the curation stage computes exactly these numbers, clip by clip
        # the same function on the same one-clip shape: bit-equal on any CPU (the batch of two may take other kernels)
        assert np.array_equal(pipeline_log_mel(clip.numpy()), log_mel(clip).numpy())
        torch.testing.assert_close(log_mel(clip), features, rtol=1e-6, atol=1e-6)


def test_griffin_lim_round_trip_keeps_a_tone():
    cfg = MelConfig()
    mel = log_mel(tone(1_000.0, 0.5))  # 8000 samples → 32 frames
    wave = griffin_lim(mel, cfg, iterations=32)
    assert wave.shape == (samples_for(mel.shape[-1]),) and torch.isfinite(wave).all()
    again = log_mel(wave)
    assert again.shape == mel.shape
    profile, profile_again = mel.exp().mean(-1), again.exp().mean(-1)  # (80,) mean mel magnitude per bin
    assert abs(int(profile.argmax()) - int(profile_again.argmax())) <= 1
    assert np.corrcoef(profile.numpy(), profile_again.numpy())[0, 1] > 0.95
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(float(spectrum.argmax()) * cfg.sample_rate / len(wave) - 1_000.0) < 30.0  # the pitch is kept
    with pytest.raises(ValueError, match="80 bins.*64"):
        griffin_lim(torch.zeros(64, 10), cfg)


# ---- the VAE ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 7, 16, 33])
def test_encode_decode_shapes_for_any_length(frames):
    vae = tiny()
    mel = torch.randn(2, 80, frames)
    latent = vae.encode(mel)
    assert latent.shape == (2, 20, math.ceil(frames / 2)) == (2, 20, vae.latent_frames(frames))
    assert vae.decode(latent).shape == (2, 80, 2 * math.ceil(frames / 2))  # odd counts: padded to even
    assert vae.decode(latent, frames).shape == mel.shape
    reconstruction, mean, logvar = vae(mel)
    assert reconstruction.shape == mel.shape and mean.shape == logvar.shape == latent.shape


def test_paper_size_shapes_and_latent_normalisation():
    with torch.device("meta"):  # the paper's size without allocating it: shapes only
        vae = AudioVAE(AudioVAEConfig())
        assert vae.encode(torch.empty(1, 80, 624), sample=False).shape == (1, 20, 312)  # official (20, 312)
    assert 200e6 < sum(p.numel() for p in vae.parameters()) < 220e6  # 213 M: encoder 114 M, decoder 99 M
    assert sum(p.numel() for p in tiny().parameters()) < 30_000
    scaled = tiny(scaling_factor=0.5, shift_factor=1.0)
    mel = torch.randn(1, 80, 8)
    mean, _ = scaled.moments(mel)
    torch.testing.assert_close(scaled.encode(mel, sample=False), (mean - 1.0) * 0.5)
    plain = tiny()
    torch.testing.assert_close(scaled.decode(scaled.encode(mel, sample=False)), plain.decode(mean))


def test_save_load_round_trip_is_bit_exact_and_records_the_mel_config(tmp_path):
    mel_cfg = MelConfig(n_mels=64, f_max=7_600.0)
    vae = tiny(mel=to_dict(mel_cfg), scaling_factor=0.73)
    vae.save_pretrained(tmp_path / "vae")
    written = json.loads((tmp_path / "vae" / CONFIG_FILE).read_text())
    assert written["format"] == AUDIO_VAE_FORMAT and written["model"]["mel"]["f_max"] == 7_600.0
    assert read_audio_vae_config(tmp_path / "vae") == vae.config
    loaded = AudioVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config.mel == mel_cfg and loaded.config.scaling_factor == 0.73
    ours, theirs = vae.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    mel = torch.randn(1, 64, 10)
    assert torch.equal(vae.encode(mel, sample=False), loaded.encode(mel, sample=False))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / CONFIG_FILE).write_text(json.dumps({"format": "lumina-ray/nextdit", "model": {}}))
    with pytest.raises(CheckpointError, match="lumina-ray/audio-vae"):
        AudioVAE.from_pretrained(tmp_path / "other")


def test_save_load_through_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMINA_CACHE", str(tmp_path / "cache"))
    vae = tiny(scaling_factor=0.5)
    url = f"s3://{s3_bucket}/audio-vae"
    vae.save_pretrained(url)
    assert read_audio_vae_config(url) == vae.config
    loaded = AudioVAE.from_pretrained(url)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))


def test_wrong_channel_counts_fail_naming_both():
    vae = tiny()
    with pytest.raises(ValueError, match=r"80.*64"):
        vae.encode(torch.randn(1, 64, 16))
    with pytest.raises(ValueError, match=r"20.*8 channels"):
        vae.decode(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="cannot give 9"):
        vae.decode(torch.randn(1, 20, 4), frames=9)
    with pytest.raises(ConfigError, match="down_levels"):
        AudioVAEConfig(down_levels=(2,))


# ---- training --------------------------------------------------------------------------------------------------------
def test_a_few_steps_reduce_the_reconstruction_loss():
    vae = tiny()
    disc = MultiWindowDiscriminator(DiscriminatorConfig(windows=(8, 16), channels=4, layers=2))
    mel = log_mel(torch.stack([tone(f, 0.25) for f in (220.0, 440.0, 880.0, 1_760.0)]))  # (4, 80, 16)
    cfg = AudioVAELossConfig(disc_start=10**9)  # reconstruction and KL only
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        loss, _, logs = vae_loss(vae, disc, mel, step, cfg, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["rec_l1"])
    # better than halved, and better than the best constant per mel bin: it reconstructs the tones, not just the level
    per_bin = mel.transpose(0, 1).reshape(80, -1).median(-1).values[None, :, None]
    assert losses[-1] < min(0.5 * losses[0], float((mel - per_bin).abs().mean())), losses
    # with the discriminator on: the adversarial term and the discriminator's step both run and reach the weights
    cfg = AudioVAELossConfig(disc_start=0)
    loss, reconstruction, logs = vae_loss(vae, disc, mel, 1, cfg, generator)
    assert {"adv", "adv_weight"} <= logs.keys() and math.isfinite(logs["loss"])
    d_loss, d_logs = discriminator_loss(disc, mel, reconstruction, 1, cfg, generator)
    disc.zero_grad()
    d_loss.backward()
    assert d_logs["d_loss"] > 0 and all(p.grad is not None for p in disc.parameters())


def test_discriminator_takes_clips_of_any_length():
    disc = MultiWindowDiscriminator(DiscriminatorConfig(channels=8))
    for frames in (5, 40, 200):
        logits = disc(torch.randn(2, 80, frames), generator=torch.Generator().manual_seed(frames))
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    mel = torch.randn(2, 80, 300)
    starts = disc.random_starts(300, torch.Generator().manual_seed(0))
    assert all(0 <= s <= 300 - w for s, w in zip(starts, disc.config.windows))
    assert torch.equal(disc(mel, starts), disc(mel, starts))
