"""Audio generation geometry and decoding (paper §5.2): seconds ↔ mel frames ↔ latent frames, and latent → waveform.

A clip of d seconds is n = round(d · sample_rate) samples, ``mel.frames_for(n)`` log-mel frames (n // hop + 1) and
``vae.latent_frames(frames)`` latent frames (the VAE halves time once, padding an odd count). Next-DiT sees the latent
as one row of frames (C, 1, T). Decoding runs the VAE to a log-mel, then a vocoder to a waveform cropped to n samples;
the vocoder without weights is Griffin-Lim (``models.mel.griffin_lim``), deterministic. It gives (frames − 1)·hop
samples, so the last few milliseconds (< one hop) of the asked length are silence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.audio_vae import AudioVAE
from models.mel import frames_for, griffin_lim

MAX_DURATION_S = 30.0  # default upper bound on a request's duration (SamplerConfig.max_duration)
AUDIO_FORMATS = ("wav", "flac")  # the files a clip is written as


@dataclass(frozen=True)
class ClipShape:
    """The sizes of one clip at every stage."""

    seconds: float
    samples: int
    mel_frames: int
    latent_frames: int

    @property
    def latent(self) -> tuple[int, int]:
        """(1, T): the latent's spatial shape as the model takes it."""
        return 1, self.latent_frames


def clip_shape(vae: AudioVAE, seconds: float) -> ClipShape:
    """The shape of a ``seconds``-long clip under this VAE's mel config."""
    samples = round(seconds * vae.mel.sample_rate)
    mel_frames = frames_for(samples, vae.mel)
    return ClipShape(seconds, samples, mel_frames, vae.latent_frames(mel_frames))


def check_duration(seconds, max_seconds: float = MAX_DURATION_S) -> None:
    """A duration is a positive number of seconds, at most ``max_seconds``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"duration {seconds!r} must be a positive number of seconds")
    if seconds > max_seconds:
        raise ValueError(f"duration {seconds} s exceeds the maximum of {max_seconds} s")


@torch.no_grad()
def decode_audio(vae: AudioVAE, latent: torch.Tensor, shape: ClipShape,
                 iterations: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One latent (C, 1, T) → (waveform (samples,) float32 in [-1, 1], log-mel (n_mels, frames) float32)."""
    param = next(vae.parameters())
    mel = vae.decode(latent[:, 0][None].to(param.device, param.dtype), frames=shape.mel_frames)[0].float()
    waveform = griffin_lim(mel.cpu(), vae.mel, iterations=iterations)[: shape.samples].clamp(-1, 1)
    # (frames − 1)·hop samples come back; the last < hop samples of the asked length are silence
    waveform = torch.nn.functional.pad(waveform, (0, shape.samples - waveform.shape[-1]))
    return waveform.numpy().astype(np.float32), mel.cpu().numpy()


def audio_bytes(waveform: np.ndarray, sample_rate: int, audio_format: str = "wav") -> bytes:
    """A mono float waveform as a 16-bit PCM WAV or FLAC file."""
    import io

    import soundfile

    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    buf = io.BytesIO()
    soundfile.write(buf, waveform, sample_rate, format=audio_format.upper(), subtype="PCM_16")
    return buf.getvalue()
