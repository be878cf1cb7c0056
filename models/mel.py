"""Log-mel features: the one definition of the audio front end, its parameters and its inverse (paper §5.2).

Paper §5.2: audio is resampled to 16 kHz and turned into a mel spectrogram with FFT size 1024 and hop 256; the mel VAE
(``models/audio_vae.py``) compresses it. The rest is ours (docs/design-decisions.md#log-mel-features): 80 bins from 0
to 8 kHz, Hann window, centred frames, magnitudes (power 1), Slaney-normalised filters on the Slaney mel scale, natural
log with a 1e-5 floor — the HiFi-GAN / BigVGAN convention that 16-kHz vocoders expect::

    S = |STFT_hann(x)|            (n_fft // 2 + 1, frames)     frames = samples // hop + 1
    M = log(max(Fᵀ S, floor))     (n_mels, frames)             F: (n_fft // 2 + 1, n_mels) Slaney filter bank

``griffin_lim`` inverts it without a neural vocoder (a check and a fallback, not the paper's BigVGAN): exp, the
least-squares magnitudes S ≈ pinv(Fᵀ)·exp(M), then Griffin-Lim phase recovery with the same STFT.

This module imports torch only inside its functions, so ``MelConfig`` and the frame arithmetic are cheap to import in
model-free curation workers (``pipelines.constants`` takes its sample rate from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from models.config_io import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MelConfig:
    """The log-mel parameters (docs/design-decisions.md#log-mel-features); a mel VAE folder records its own."""

    sample_rate: int = 16_000
    n_fft: int = 1024  # window = FFT size: a Hann window of n_fft samples
    hop_length: int = 256
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    log_floor: float = 1e-5  # log(max(mel, floor)): log(1e-5) ≈ -11.51 is silence

    def __post_init__(self):
        if min(self.sample_rate, self.n_fft, self.hop_length, self.n_mels) < 1:
            raise ConfigError(f"sample_rate, n_fft, hop_length and n_mels must be ≥ 1, got {self}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError(f"need 0 ≤ f_min < f_max ≤ sample_rate / 2, got f_min {self.f_min}, "
                              f"f_max {self.f_max} at {self.sample_rate} Hz")
        if self.log_floor <= 0:
            raise ConfigError(f"log_floor must be > 0, got {self.log_floor}")

    @property
    def silence(self) -> float:
        """The log-mel value of silence, log(floor): what padding frames hold."""
        return math.log(self.log_floor)


def frames_for(samples: int, cfg: MelConfig = MelConfig()) -> int:
    """Frames of a clip of ``samples`` samples: centred frames every hop, n // hop + 1."""
    return samples // cfg.hop_length + 1


def samples_for(frames: int, cfg: MelConfig = MelConfig()) -> int:
    """Samples of the shortest clip with ``frames`` frames, (frames − 1)·hop: what ``griffin_lim`` returns."""
    if frames < 1:
        raise ValueError(f"a mel spectrogram has at least 1 frame, got {frames}")
    return (frames - 1) * cfg.hop_length


@lru_cache(maxsize=8)
def mel_filters(cfg: MelConfig) -> torch.Tensor:
    """F: (n_fft // 2 + 1, n_mels) float32, Slaney-normalised triangles on the Slaney mel scale (torchaudio's, as
    ``torchaudio.transforms.MelSpectrogram(norm="slaney", mel_scale="slaney")`` builds them). Cached per config."""
    import torchaudio.functional as AF

    return AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate,
                              norm="slaney", mel_scale="slaney")


def log_mel(waveform: torch.Tensor, cfg: MelConfig = MelConfig()) -> torch.Tensor:
    """Mono waveform (…, samples) at ``cfg.sample_rate`` → (…, n_mels, frames) float32 natural-log mel spectrogram.

    The same numbers as ``torchaudio.transforms.MelSpectrogram(power=1, norm="slaney", mel_scale="slaney",
    center=True)`` followed by log(max(·, floor)): reflect-padded centred frames, a periodic Hann window."""
    import torch

    x = waveform.float()
    window = torch.hann_window(cfg.n_fft, device=x.device)
    shape = x.shape
    stft = torch.stft(x.reshape(-1, shape[-1]), n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft,
                      window=window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True)
    magnitudes = stft.abs().reshape(*shape[:-1], *stft.shape[-2:])  # S: (…, n_fft // 2 + 1, frames)
    fb = mel_filters(cfg).to(x.device)
    mel = torch.matmul(magnitudes.transpose(-1, -2), fb).transpose(-1, -2)  # Fᵀ S: (…, n_mels, frames)
    return torch.log(torch.clamp(mel, min=cfg.log_floor))


@lru_cache(maxsize=8)
def _inverse_filters(cfg: MelConfig) -> torch.Tensor:
    """pinv(Fᵀ): (n_fft // 2 + 1, n_mels), the minimum-norm least-squares inverse of the filter bank (in float64)."""
    import torch

    return torch.linalg.pinv(mel_filters(cfg).double().T).float()


def griffin_lim(log_mel: torch.Tensor, cfg: MelConfig = MelConfig(), iterations: int = 32,
                momentum: float = 0.99) -> torch.Tensor:
    """(…, n_mels, frames) log-mel → (…, samples_for(frames)) waveform: a vocoder without weights.

    S = max(pinv(Fᵀ)·exp(M), 0) estimates the STFT magnitudes; ``iterations`` of fast Griffin-Lim
    (torchaudio.functional.griffinlim, momentum ``momentum``) recover a phase for them with the STFT of ``log_mel``
    (same n_fft, hop and window). The phase starts at zero, so the result is deterministic."""
    import torch
    import torchaudio.functional as AF

    if log_mel.shape[-2] != cfg.n_mels:
        raise ValueError(f"expected a log-mel of {cfg.n_mels} bins (the mel config), got {log_mel.shape[-2]} "
                         f"(shape {tuple(log_mel.shape)})")
    mel = log_mel.float().exp()
    magnitudes = torch.relu(torch.matmul(_inverse_filters(cfg).to(mel.device), mel))  # (…, n_fft // 2 + 1, frames)
    window = torch.hann_window(cfg.n_fft, device=mel.device)
    return AF.griffinlim(magnitudes, window, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft,
                         power=1.0, n_iter=iterations, momentum=momentum,
                         length=samples_for(log_mel.shape[-1], cfg), rand_init=False)
