"""AudioLDM's mel autoencoder: a diffusers ``AutoencoderKL`` that sees a log-mel spectrogram as a one-channel image.

AudioLDM (docs/official-formats.md#audioldm-layout) encodes a mel of T frames × 64 bins as an image (B, 1, T, 64) —
time is the image's height — into 8 latent channels at a quarter of the resolution on both axes, and decodes
``vae.decode(latents / scaling_factor).sample`` back to (B, 1, T, 64). This module wraps it in the interface of our 1D
mel VAE (``models/audio_vae.py``: ``mel``, ``latent_channels``, ``latent_frames``, ``encode`` / ``decode`` on
(B, n_mels, T) log-mels) and keeps our convention that time is the last axis::

    mel (B, 64, T) ─pad T to a multiple of 4─► image (B, 1, T, 64) ─encoder─► (B, 8, T/4, 16) ─► latent (B, 8, 16, T/4)

so a latent is (C, F, T): F = n_mels / 4 frequency rows that Next-DiT covers with 2D RoPE (frequency × time), where
ours is one row (C, 1, T). The features are ours (``models.mel.log_mel``): AudioLDM's are the same convention (natural
log, 1e-5 floor, Slaney filters, magnitude STFT), with its own parameters ``AUDIOLDM_MEL``; a VAE folder may override
them in ``mel.json`` (docs/design-decisions.md#audioldm-vae).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.audio_vae import AudioVAE, MelLatents
from models.checkpoint import CONFIG_FILE
from models.config_io import ConfigError, from_dict, to_dict
from models.formats import CheckpointError
from models.mel import MelConfig
from models.storage import filesystem, local_path

# AudioLDM's features (its TacotronSTFT settings): 16 kHz, n_fft 1024, hop 160 (100 frames a second), 64 bins 0–8 kHz.
AUDIOLDM_MEL = MelConfig(sample_rate=16_000, n_fft=1024, hop_length=160, n_mels=64, f_min=0.0, f_max=8_000.0)
MEL_FILE = "mel.json"  # optional, beside a diffusers mel VAE's config.json: MelConfig fields over AUDIOLDM_MEL
MEL_AUTOENCODER_FORMAT = "diffusers/AutoencoderKL"  # the "format" of its encoder record (ours: AUDIO_VAE_FORMAT)


@dataclass(frozen=True)
class AudioLDMVAEConfig:
    """What the platform needs of a diffusers mel ``AutoencoderKL``, from its config.json (and ``mel.json``) alone."""

    mel: MelConfig = field(default_factory=lambda: AUDIOLDM_MEL)
    latent_channels: int = 8
    downsample: int = 4  # 2 ** (down blocks − 1) per axis: diffusers' vae_scale_factor
    scaling_factor: float = 1.0  # latent = (sample − shift)·scale; AudioLDM's config.json has 0.9227…
    shift_factor: float = 0.0

    def __post_init__(self):
        if self.mel.n_mels % self.downsample:
            raise ConfigError(f"a mel VAE that downsamples by {self.downsample} needs n_mels divisible by it, got "
                              f"{self.mel.n_mels} (its mel config: {self.mel})")

    @property
    def format(self) -> str:
        return MEL_AUTOENCODER_FORMAT

    @property
    def latent_rows(self) -> int:
        """Frequency rows of a latent: n_mels / downsample (16 for AudioLDM)."""
        return self.mel.n_mels // self.downsample


def read_audioldm_vae_config(path: str, storage: dict | None = None) -> AudioLDMVAEConfig:
    """The ``AudioLDMVAEConfig`` of a diffusers ``AutoencoderKL`` folder, local or s3:// (config.json and the optional
    mel.json, no weights): its missing keys take ``AutoencoderKL.__init__``'s defaults, as a loaded model does. A
    folder whose autoencoder does not read one-channel images (an image VAE) is a CheckpointError."""
    from diffusers import AutoencoderKL

    fs, root = filesystem(str(path), storage)
    with fs.open(f"{root}/{CONFIG_FILE}", "r") as f:
        own = json.load(f)
    params = inspect.signature(AutoencoderKL.__init__).parameters.values()
    own = {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **own}
    if own.get("_class_name") != "AutoencoderKL" or (own["in_channels"], own["out_channels"]) != (1, 1):
        raise CheckpointError(f"{path}: {CONFIG_FILE} describes a {own.get('_class_name')} of in_channels "
                              f"{own['in_channels']}, out_channels {own['out_channels']}: a diffusers mel VAE is an "
                              "AutoencoderKL of 1 channel (a log-mel seen as an image, AudioLDM's)")
    mel = to_dict(AUDIOLDM_MEL)
    if fs.exists(f"{root}/{MEL_FILE}"):
        with fs.open(f"{root}/{MEL_FILE}", "r") as f:
            mel.update(json.load(f))
    return AudioLDMVAEConfig(mel=from_dict(MelConfig, mel, _where=f"{path}/{MEL_FILE}"),
                             latent_channels=int(own["latent_channels"]),
                             downsample=2 ** (len(own["block_out_channels"]) - 1),
                             scaling_factor=float(own["scaling_factor"]),
                             shift_factor=float(own.get("shift_factor") or 0.0))


class AudioLDMVAE(MelLatents, nn.Module):
    """Log-mel (B, n_mels, T) ↔ normalised latents (B, latent_channels, n_mels / 4, ⌈T / 4⌉) through AudioLDM's
    ``AutoencoderKL``; the same inference API as ``models.audio_vae.AudioVAE`` (no gradients, fp32 by default)."""

    def __init__(self, autoencoder: nn.Module, config: AudioLDMVAEConfig):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.config = config

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n_mels, T) log-mel → (B, C, F, ⌈T / downsample⌉) normalised latents (sample − shift)·scale; ``sample``
        draws from the posterior (noise on the CPU from ``generator``, as ``AudioVAE``), else its mean."""
        if mel.ndim != 3 or mel.shape[1] != self.mel.n_mels:
            raise ValueError(f"expected a log-mel of this VAE's {self.mel.n_mels} mel bins, (B, {self.mel.n_mels}, "
                             f"frames), got shape {tuple(mel.shape)}")
        pad = self.latent_frames(mel.shape[-1]) * self.config.downsample - mel.shape[-1]
        image = F.pad(mel, (0, pad), value=self.mel.silence).transpose(1, 2)[:, None]  # (B, 1, T, n_mels)
        param = next(self.autoencoder.parameters())
        posterior = self.autoencoder.encode(image.to(param.device, param.dtype)).latent_dist
        z = AudioVAE.sample_posterior(posterior.mean, posterior.logvar, generator) if sample else posterior.mean
        z = (z - self.config.shift_factor) * self.config.scaling_factor  # (B, C, T', F)
        return z.transpose(2, 3).contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """(B, C, F, t) normalised latents → (B, n_mels, t · downsample) log-mel, or its first ``frames`` frames."""
        want = (self.latent_channels, self.latent_rows)
        if latent.ndim != 4 or tuple(latent.shape[1:3]) != want:
            raise ValueError(f"expected a latent of this VAE's {want[0]} channels × {want[1]} frequency rows, "
                             f"(B, {want[0]}, {want[1]}, frames), got shape {tuple(latent.shape)}")
        total = latent.shape[-1] * self.config.downsample
        if frames is not None and not 0 < frames <= total:
            raise ValueError(f"a latent of {latent.shape[-1]} frames decodes to {total} mel frames, "
                             f"cannot give {frames}")
        param = next(self.autoencoder.parameters())
        z = latent.transpose(2, 3) / self.config.scaling_factor + self.config.shift_factor  # (B, C, t, F)
        image = self.autoencoder.decode(z.to(param.device, param.dtype)).sample  # (B, 1, T, n_mels)
        return image[:, 0].transpose(1, 2)[..., :frames]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> AudioLDMVAE:
        """Load a diffusers ``AutoencoderKL`` folder of a mel VAE (a remote one is cached once per machine)."""
        from diffusers import AutoencoderKL

        config = read_audioldm_vae_config(str(path))
        try:
            autoencoder = AutoencoderKL.from_pretrained(local_path(str(path)), torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load an AutoencoderKL from {str(path)!r}: {exc}") from exc
        return cls(autoencoder.to(device), config)
