"""Audio generation geometry and decoding (paper §5.2): seconds ↔ mel frames ↔ latent frames, latent → waveform, and
which mel VAE a folder holds.

A clip of d seconds is n = round(d · sample_rate) samples, ``mel.frames_for(n)`` log-mel frames (n // hop + 1) and
``vae.latent_frames(frames)`` latent frames (our VAE halves time once, AudioLDM's quarters it; the count is padded).
Next-DiT sees the latent as ``vae.latent_rows`` rows of frames: (C, 1, T) for our 1D VAE, (C, F, T) for a 2D mel VAE
(AudioLDM's, F = n_mels / 4). Decoding runs the VAE to a log-mel, then a vocoder (``models.vocoder``) to a waveform
cropped to n samples; Griffin-Lim, the vocoder without weights, gives (frames − 1)·hop samples, so the last few
milliseconds (< one hop) of the asked length are silence.

Two mel VAEs share one interface (``mel``, ``latent_channels``, ``latent_rows``, ``latent_frames``, ``encode``,
``decode``): ours (``models.audio_vae.AudioVAE``) and a diffusers ``AutoencoderKL`` on mel images
(``models.audioldm.AudioLDMVAE``). ``find_audio_vae`` tells the three folder kinds apart, ``load_audio_vae`` loads
one, ``audio_vae_config`` reads its config alone (docs/official-formats.md#audioldm-layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from models.audio_vae import AUDIO_VAE_FORMAT, AudioVAE, AudioVAEConfig, read_audio_vae_config
from models.audioldm import AudioLDMVAE, AudioLDMVAEConfig, read_audioldm_vae_config
from models.checkpoint import CONFIG_FILE
from models.config_io import ConfigError
from models.formats import CheckpointError
from models.mel import frames_for
from models.presets import PRESETS, NextDiTConfig
from models.storage import filesystem, join
from models.vocoder import GriffinLim, Vocoder

MEL_VAES = (AudioVAE, AudioLDMVAE)  # the autoencoders an audio model decodes with
MelVAE = AudioVAE | AudioLDMVAE
# The kinds of mel VAE folder: ours (config.json "format": AUDIO_VAE_FORMAT), a diffusers AutoencoderKL folder of a
# 1-channel (mel) autoencoder, an AudioLDM pipeline folder (vae/ and vocoder/ subfolders).
OURS, DIFFUSERS, AUDIOLDM = "lumina-ray", "diffusers", "audioldm"
PIPELINE_VAE, PIPELINE_VOCODER = "vae", "vocoder"  # the subfolders of a diffusers audio pipeline

MAX_DURATION_S = 30.0  # default upper bound on a request's duration (SamplerConfig.max_duration)
AUDIO_FORMATS = ("wav", "flac")  # the files a clip is written as


@dataclass(frozen=True)
class ClipShape:
    """The sizes of one clip at every stage."""

    seconds: float
    samples: int
    mel_frames: int
    latent_frames: int
    latent_rows: int = 1  # frequency rows of the latent: 1 for our VAE, n_mels / 4 for AudioLDM's

    @property
    def latent(self) -> tuple[int, int]:
        """(rows, T): the latent's spatial shape as the model takes it."""
        return self.latent_rows, self.latent_frames


def clip_shape(vae: MelVAE, seconds: float) -> ClipShape:
    """The shape of a ``seconds``-long clip under this VAE's mel config."""
    samples = round(seconds * vae.mel.sample_rate)
    mel_frames = frames_for(samples, vae.mel)
    return ClipShape(seconds, samples, mel_frames, vae.latent_frames(mel_frames), vae.latent_rows)


def check_audio_latents(model: NextDiTConfig, channels: int, rows: int, source: str) -> None:
    """An audio model fits latents of ``channels`` channels × ``rows`` frequency rows: its ``in_channels``, and RoPE
    channels on the frequency axis exactly when there is more than one row — 2D RoPE (frequency × time) over a 2D mel
    VAE's (C, F, T), 1D RoPE (time) over our (C, 1, T). A ConfigError naming ``source`` and the presets that fit."""
    if channels != model.in_channels:
        raise ConfigError(f"{source} gives {channels} latent channels; the model takes {model.in_channels}")
    axes = model.rope_axes
    if (rows > 1) == bool(axes[1]):
        return
    fit = [name for name, p in PRESETS.items() if p.get("modality") == "audio"
           and bool((p.get("rope_axes_dims") or (0, 1, 1))[1]) == (rows > 1)]
    if rows > 1:
        raise ConfigError(f"{source} gives latents of {rows} frequency rows (C, F, T), but the model's RoPE has no "
                          f"frequency axis (rope_axes_dims {list(axes)}): use a preset with 2D RoPE "
                          f"({', '.join(fit)}) or rope_axes_dims [0, d, d]")
    raise ConfigError(f"{source} gives latents of one row of frames (C, 1, T), but the model's RoPE has a frequency "
                      f"axis (rope_axes_dims {list(axes)}): use a preset with 1D RoPE ({', '.join(fit)}) or "
                      "rope_axes_dims [0, 0, head_dim]")


def check_duration(seconds, max_seconds: float = MAX_DURATION_S) -> None:
    """A duration is a positive number of seconds, at most ``max_seconds``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"duration {seconds!r} must be a positive number of seconds")
    if seconds > max_seconds:
        raise ValueError(f"duration {seconds} s exceeds the maximum of {max_seconds} s")


@torch.no_grad()
def decode_audio(vae: MelVAE, latent: torch.Tensor, shape: ClipShape,
                 vocoder: Vocoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One latent (C, rows, T) → (waveform (samples,) float32 in [-1, 1], log-mel (n_mels, frames) float32), through
    ``vocoder`` (default Griffin-Lim)."""
    param = next(vae.parameters())
    stored = latent[:, 0] if vae.latent_rows == 1 else latent  # our VAE's latents are (C, T)
    mel = vae.decode(stored[None].to(param.device, param.dtype), frames=shape.mel_frames)[0].float()
    waveform = (vocoder or GriffinLim(vae.mel)).vocode(mel)[: shape.samples].clamp(-1, 1)
    # Griffin-Lim gives (frames − 1)·hop samples: the last < hop samples of the asked length are silence
    waveform = torch.nn.functional.pad(waveform, (0, shape.samples - waveform.shape[-1]))
    return waveform.numpy().astype(np.float32), mel.cpu().numpy()


# ---- which mel VAE a folder holds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioVAEFolder:
    """Where the parts of a mel VAE reference are."""

    kind: str  # OURS, DIFFUSERS or AUDIOLDM
    vae: str  # the folder of the autoencoder itself (an AudioLDM pipeline's vae/)
    vocoder: str | None  # the vocoder published with it (an AudioLDM pipeline's vocoder/), else None


def find_audio_vae(path: str, storage: dict | None = None) -> AudioVAEFolder:
    """The kind of mel VAE folder at ``path`` (local or s3://, fsspec ``storage`` options), from its json files alone:
    ours, a diffusers ``AutoencoderKL`` of 1 channel, or a pipeline folder with ``vae/`` (and ``vocoder/``). Anything
    else is a CheckpointError (a config.json of another kind) or FileNotFoundError (none) naming what it found."""
    fs, root = filesystem(str(path), storage)
    if fs.exists(f"{root}/{CONFIG_FILE}"):
        with fs.open(f"{root}/{CONFIG_FILE}", "r") as f:
            data = json.load(f)
        if data.get("format") == AUDIO_VAE_FORMAT:
            return AudioVAEFolder(OURS, str(path), None)
        if data.get("_class_name") == "AutoencoderKL" and data.get("in_channels") == 1:
            return AudioVAEFolder(DIFFUSERS, str(path), None)
        raise CheckpointError(
            f"{path}: {CONFIG_FILE} has format {data.get('format')!r} and _class_name {data.get('_class_name')!r} "
            f"(in_channels {data.get('in_channels')!r}): not a mel VAE — expected ours (format {AUDIO_VAE_FORMAT!r}), "
            "a diffusers AutoencoderKL of in_channels 1, or an AudioLDM pipeline folder with vae/")
    if fs.exists(f"{root}/{PIPELINE_VAE}/{CONFIG_FILE}"):
        vocoder = fs.exists(f"{root}/{PIPELINE_VOCODER}/{CONFIG_FILE}")
        found = find_audio_vae(join(str(path), PIPELINE_VAE), storage)
        if found.kind != DIFFUSERS:
            raise CheckpointError(f"{path}: its {PIPELINE_VAE}/ is not a diffusers mel AutoencoderKL")
        return AudioVAEFolder(AUDIOLDM, found.vae, join(str(path), PIPELINE_VOCODER) if vocoder else None)
    raise FileNotFoundError(f"no {CONFIG_FILE} at {path}: not a mel VAE folder (ours, a diffusers AutoencoderKL, or "
                            f"an AudioLDM pipeline folder with {PIPELINE_VAE}/)")


def audio_vae_config(path: str, storage: dict | None = None) -> AudioVAEConfig | AudioLDMVAEConfig:
    """The config of the mel VAE at ``path`` without its weights (mel features, latent channels and rows, downsampling,
    scale, shift, ``format``): what curation records and computes its features with."""
    folder = find_audio_vae(path, storage)
    if folder.kind == OURS:
        return read_audio_vae_config(folder.vae, storage)
    return read_audioldm_vae_config(folder.vae, storage)


def load_audio_vae(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MelVAE:
    """The mel VAE of any folder kind ``find_audio_vae`` knows (an AudioLDM pipeline: its vae/), in eval mode."""
    folder = find_audio_vae(path)
    cls = AudioVAE if folder.kind == OURS else AudioLDMVAE
    return cls.from_pretrained(folder.vae, device, dtype)


def audio_bytes(waveform: np.ndarray, sample_rate: int, audio_format: str = "wav") -> bytes:
    """A mono float waveform as a 16-bit PCM WAV or FLAC file."""
    import io

    import soundfile

    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    buf = io.BytesIO()
    soundfile.write(buf, waveform, sample_rate, format=audio_format.upper(), subtype="PCM_16")
    return buf.getvalue()
