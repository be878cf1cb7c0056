"""Vocoders: a log-mel spectrogram (n_mels, frames) → a waveform, the last step of audio generation (paper §5.2).

Two kinds, one small interface (``Vocoder.vocode``; ``name`` goes into a clip's metadata):

- ``GriffinLim``: no weights, always available (``models.mel.griffin_lim``: deterministic, (frames − 1)·hop samples)
  — for checks and previews, not for quality;
- ``HifiGan``: a HiFi-GAN generator in the transformers ``SpeechT5HifiGan`` layout (a folder with config.json and the
  weights, as AudioLDM publishes under ``vocoder/``), frames·hop samples. Our log-mel is its convention (natural log,
  1e-5 floor, Slaney filters, magnitude STFT), so the mel goes in as it is, transposed to (B, frames, n_mels).

A HiFi-GAN fits a mel VAE only when it was trained on the same features: ``check_vocoder`` compares its
``model_in_dim``, ``sampling_rate`` and the product of its ``upsample_rates`` (samples per frame) with the VAE's
``MelConfig`` and names every mismatch. Which vocoder a Sampler runs: docs/sampling.md#audio.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from models.config_io import ConfigError
from models.formats import CheckpointError
from models.mel import MelConfig, griffin_lim
from models.storage import local_path

GRIFFIN_LIM = "griffin_lim"  # a vocoder reference that names Griffin-Lim (e.g. --vocoder griffin_lim)
HIFIGAN = "hifigan"


@dataclass
class VocoderConfig:
    """A vocoder reference: a ``SpeechT5HifiGan`` folder (local or s3://) or ``GRIFFIN_LIM``; None: the default."""

    path: str | None = None


class Vocoder(ABC):
    """log-mel (n_mels, frames) of ``mel``'s features → mono float waveform (samples,) at ``mel.sample_rate``."""

    name: str
    mel: MelConfig

    @abstractmethod
    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, frames) → (samples,) float32 on the CPU."""

    @abstractmethod
    def check(self, mel: MelConfig) -> None:
        """Raise ConfigError unless this vocoder reads the features of ``mel``."""


class GriffinLim(Vocoder):
    """Griffin-Lim phase recovery from zero phase (``models.mel.griffin_lim``): deterministic, no weights."""

    name = GRIFFIN_LIM

    def __init__(self, mel: MelConfig, iterations: int = 32):
        self.mel, self.iterations = mel, iterations

    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        return griffin_lim(log_mel.float().cpu(), self.mel, iterations=self.iterations)

    def check(self, mel: MelConfig) -> None:
        if mel != self.mel:
            raise ConfigError(f"Griffin-Lim was set up for {self.mel}, the mel VAE's features are {mel}")


def check_vocoder(config, mel: MelConfig, where: str = "the vocoder") -> None:
    """A ``SpeechT5HifiGanConfig`` against the mel VAE's ``MelConfig``: one ConfigError naming every mismatch."""
    hop = math.prod(config.upsample_rates)
    wrong = [f"{name} {have} ≠ {want_name} {want}" for name, have, want_name, want in (
        ("model_in_dim", config.model_in_dim, "n_mels", mel.n_mels),
        ("sampling_rate", config.sampling_rate, "sample_rate", mel.sample_rate),
        (f"the product of upsample_rates {list(config.upsample_rates)}", hop, "hop_length", mel.hop_length),
    ) if have != want]
    if wrong:
        raise ConfigError(f"{where} does not fit the mel VAE's features ({mel}): " + "; ".join(wrong))


class HifiGan(Vocoder):
    """A ``transformers.SpeechT5HifiGan`` (HiFi-GAN generator) for the features ``mel``; runs in fp32 on its device."""

    name = HIFIGAN

    def __init__(self, model: torch.nn.Module, mel: MelConfig, where: str = "the vocoder"):
        check_vocoder(model.config, mel, where)
        self.model = model.eval().requires_grad_(False)
        self.mel = mel

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, mel: MelConfig,
                        device: str | torch.device = "cpu") -> HifiGan:
        """Load a ``SpeechT5HifiGan`` folder (a remote one is cached once per machine); its config is checked against
        ``mel`` before any weights are read."""
        from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

        folder = local_path(str(path))
        try:
            config = SpeechT5HifiGanConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"vocoder {str(path)!r}: not a SpeechT5HifiGan folder ({exc})") from exc
        check_vocoder(config, mel, f"vocoder {str(path)!r}")
        model = SpeechT5HifiGan.from_pretrained(folder, config=config)
        return cls(model.to(device), mel, f"vocoder {str(path)!r}")

    def check(self, mel: MelConfig) -> None:
        check_vocoder(self.model.config, mel)

    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, frames) → (frames · hop,) float32 on the CPU."""
        param = next(self.model.parameters())
        return self.model(log_mel.T[None].to(param.device, param.dtype))[0].float().cpu()


def load_vocoder(path: str | None, mel: MelConfig, device: str | torch.device = "cpu") -> Vocoder:
    """The vocoder a reference names for the features ``mel``: Griffin-Lim for None or ``GRIFFIN_LIM``, else the
    ``SpeechT5HifiGan`` folder at ``path``."""
    if path is None or path == GRIFFIN_LIM:
        return GriffinLim(mel)
    return HifiGan.from_pretrained(path, mel, device)
