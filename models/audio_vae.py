"""The mel VAE of paper §5.2: a 1D-convolution KL autoencoder between log-mel spectrograms and audio latents.

Paper §5.2: "a modified audio VAE with a 1D-convolution-based model": an encoder from mel spectrograms (n_mels
channels × frames) to latents, a decoder back, and a multi-window discriminator for training
(``models/audio_vae_losses.py``). The official size (docs/official-formats.md#audio-and-music, config
``first_stage_config`` of the official audio / music models): 80 mel channels → 20 latent channels, width 384 with
multipliers (1, 2, 4), 2 residual blocks per level (the decoder 3), kernel 5, one 2× temporal downsampling after the
first level, attention only in the middle blocks, a diagonal Gaussian posterior (double_z). The module names are the
official ``autoencoder1d.py``'s, so its state dicts load key for key::

    mel (B, 80, T) ─encoder─► (B, 40, T/2) ─quant_conv─► mean, logvar (B, 20, T/2) ─sample─► z
    z ─post_quant_conv─► decoder ─► mel (B, 80, T)

Our choices where the paper is silent are docs/design-decisions.md#mel-vae: the VAE folder carries its own
``MelConfig``; a clip of odd (not a multiple of 2) frame count is padded on the right with silence (log floor) to the
next multiple, and ``decode(latent, frames)`` crops back, so ``decode(encode(x), x.shape[-1])`` has x's frames;
latents are normalised as z = (sample − shift)·scale, scale set by training to 1/std of the latents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from models.config_io import ConfigError, from_dict, to_dict
from models.formats import CheckpointError
from models.mel import MelConfig
from models.storage import filesystem, local_path, staged_output

AUDIO_VAE_FORMAT = "lumina-ray/audio-vae"  # config.json's "format" of a mel VAE folder

# Partial configs by name (``from_dict(AudioVAEConfig, {"preset": "tiny"})``): the paper's size, and a CPU test size.
AUDIO_VAE_PRESETS: dict[str, dict] = {
    "paper": {},
    "tiny": {"channels": 8, "channel_mult": [1, 2], "res_blocks": 1, "kernel_size": 3, "norm_groups": 4},
}


@dataclass
class AudioVAEConfig:
    """Architecture, mel front end and latent normalisation of a mel VAE; the defaults are the paper's (§5.2)."""

    PRESETS: ClassVar[dict[str, dict]] = AUDIO_VAE_PRESETS

    mel: MelConfig = field(default_factory=MelConfig)  # the features this VAE reads and writes
    latent_channels: int = 20  # official z_channels = embed_dim
    channels: int = 384  # official ch
    channel_mult: tuple[int, ...] = (1, 2, 4)  # width of each level: channels × mult
    res_blocks: int = 2  # per encoder level; the decoder has one more per level
    kernel_size: int = 5  # encoder convolutions and the decoder's conv_in / conv_out
    # The official decoder's residual blocks keep their default kernel 3 (its kernel_size 5 reaches only conv_in and
    # conv_out); kept so that official checkpoints load.
    decoder_block_kernel: int = 3
    down_levels: tuple[int, ...] = (0,)  # levels followed by a 2× temporal downsampling (official down_layers)
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6)
    scaling_factor: float = 1.0  # latent = (sample − shift_factor)·scaling_factor; training sets 1/std
    shift_factor: float = 0.0

    def __post_init__(self):
        levels = len(self.channel_mult)
        if levels < 2 or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult needs ≥ 2 levels of multipliers ≥ 1, got {self.channel_mult}")
        if len(set(self.down_levels)) != len(self.down_levels) or any(
                not 0 <= level < levels - 1 for level in self.down_levels):
            # the decoder upsamples after level i + 1 for a downsampling after encoder level i (official layout)
            raise ConfigError(f"down_levels must be distinct levels below the last ({levels - 1}), "
                              f"got {self.down_levels}")
        if any(self.channels * m % self.norm_groups for m in self.channel_mult):
            raise ConfigError(f"every level width channels × mult must divide into {self.norm_groups} norm groups, "
                              f"got channels {self.channels} × {self.channel_mult}")
        if self.kernel_size % 2 == 0 or self.decoder_block_kernel % 2 == 0:
            raise ConfigError(f"kernel sizes must be odd, got {self.kernel_size} and {self.decoder_block_kernel}")
        if self.latent_channels < 1 or self.res_blocks < 1:
            raise ConfigError("latent_channels and res_blocks must be ≥ 1")
        if self.scaling_factor <= 0:
            raise ConfigError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample(self) -> int:
        """Mel frames per latent frame."""
        return 2 ** len(self.down_levels)

    @property
    def latent_rows(self) -> int:
        """Frequency rows of a latent: 1, the mel bins are channels (a 2D mel VAE has more: models/audioldm.py)."""
        return 1

    @property
    def format(self) -> str:
        return AUDIO_VAE_FORMAT


# ---- blocks (official autoencoder1d.py: ResnetBlock1D, AttnBlock1D, Downsample1D, Upsample1D) ------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int | None = None) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2 if padding is None else padding)


class ResnetBlock1D(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), _conv(c_in, c_out, kernel)
        self.norm2, self.conv2 = _norm(c_out, groups), _conv(c_out, c_out, kernel)
        self.nin_shortcut = _conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock1D(nn.Module):
    """x + proj(softmax(q kᵀ / √C) v) over the frames: one head as wide as the block."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (_conv(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (proj(h).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B, 1, T, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)  # (B, C, T)
        return x + self.proj_out(h)


class MidBlock1D(nn.Module):
    """resnet → attention → resnet at the lowest frame rate: the only attention of the VAE."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock1D(channels, channels, kernel, groups)
        self.attn_1 = AttnBlock1D(channels, groups)
        self.block_2 = ResnetBlock1D(channels, channels, kernel, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample1D(nn.Module):
    """T → T/2: pad one frame on the right, then a stride-2 convolution of kernel 3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1)))


class Upsample1D(nn.Module):
    """T → 2T: nearest-neighbour repeat, then a convolution of kernel 3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    return level


# ---- encoder and decoder ---------------------------------------------------------------------------------------------
class Encoder1D(nn.Module):
    """(B, n_mels, T) → (B, 2·latent_channels, T / downsample): levels of residual blocks, mid block, projection."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        k, groups = cfg.kernel_size, cfg.norm_groups
        width = cfg.channels
        self.conv_in = _conv(cfg.mel.n_mels, width, k)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.res_blocks):
                blocks.append(ResnetBlock1D(width, cfg.channels * mult, k, groups))
                width = cfg.channels * mult
            level = _level(blocks)
            if i in cfg.down_levels:
                level.downsample = Downsample1D(width)
            self.down.append(level)
        self.mid = MidBlock1D(width, k, groups)
        self.norm_out = _norm(width, groups)
        self.conv_out = _conv(width, 2 * cfg.latent_channels, k)  # double_z: mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder1D(nn.Module):
    """(B, latent_channels, t) → (B, n_mels, t · downsample): the encoder mirrored, one more block per level."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        k, kb, groups = cfg.kernel_size, cfg.decoder_block_kernel, cfg.norm_groups
        width = cfg.channels * cfg.channel_mult[-1]
        self.conv_in = _conv(cfg.latent_channels, width, k)
        self.mid = MidBlock1D(width, kb, groups)
        levels = []
        for i in reversed(range(len(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.res_blocks + 1):
                blocks.append(ResnetBlock1D(width, cfg.channels * cfg.channel_mult[i], kb, groups))
                width = cfg.channels * cfg.channel_mult[i]
            level = _level(blocks)
            if i - 1 in cfg.down_levels:  # official: the upsampling of encoder level i's downsampling ends level i + 1
                level.upsample = Upsample1D(width)
            levels.insert(0, level)  # up[i] is level i, run from the last level down
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width, groups)
        self.conv_out = _conv(width, cfg.mel.n_mels, k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- the VAE ---------------------------------------------------------------------------------------------------------
class MelLatents:
    """What a mel VAE's config says of its latents, shared by ours and AudioLDM's (``models/audioldm.py``): the
    features it reads, latent channels and frequency rows, and latent frames per mel frames."""

    config: AudioVAEConfig

    @property
    def mel(self) -> MelConfig:
        return self.config.mel

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def latent_rows(self) -> int:
        return self.config.latent_rows

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a mel of ``frames`` frames: ⌈frames / downsample⌉ (the rest is padded with silence)."""
        return -(-frames // self.config.downsample)


class AudioVAE(MelLatents, nn.Module):
    """Log-mel spectrograms (B, n_mels, T) ↔ normalised latents (B, latent_channels, ⌈T / downsample⌉) (paper §5.2).

    ``encode`` / ``decode`` are the inference API (no gradients, normalised latents); training calls ``forward``
    (reconstruction and posterior, unnormalised) with the losses of ``models/audio_vae_losses.py``."""

    def __init__(self, config: AudioVAEConfig | None = None):
        super().__init__()
        self.config = config or AudioVAEConfig()
        z = self.config.latent_channels
        self.encoder = Encoder1D(self.config)
        self.decoder = Decoder1D(self.config)
        self.quant_conv = _conv(2 * z, 2 * z, 1)
        self.post_quant_conv = _conv(z, z, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight: where the adaptive adversarial weight compares gradients."""
        return self.decoder.conv_out.weight

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 3 or x.shape[1] != channels:
            got = f"{x.shape[1]} channels" if x.ndim == 3 else f"{x.ndim} dimensions"
            raise ValueError(f"expected {what}, (B, {channels}, frames), got {got} (shape {tuple(x.shape)})")

    def moments(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) log-mel → the posterior's mean and log-variance, (B, latent_channels, ⌈T / downsample⌉)
        each, unnormalised. T is padded on the right with silence (the log floor) to a multiple of the downsampling."""
        self._check(mel, self.mel.n_mels, f"a log-mel of this VAE's {self.mel.n_mels} mel bins")
        pad = self.latent_frames(mel.shape[-1]) * self.config.downsample - mel.shape[-1]
        x = F.pad(mel, (0, pad), value=self.mel.silence)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2)·ε, ε ~ N(0, I) (drawn on the CPU with ``generator``, so devices agree)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def forward(self, mel: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (B, n_mels, T) — T of ``mel`` —, posterior mean, log-variance)."""
        mean, logvar = self.moments(mel)
        z = self.sample_posterior(mean, logvar, generator) if sample else mean
        return self.decoder(self.post_quant_conv(z))[..., : mel.shape[-1]], mean, logvar

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n_mels, T) log-mel → (B, latent_channels, ⌈T / downsample⌉) normalised latents
        (sample − shift)·scale; ``sample`` draws from the posterior (official), else its mean."""
        mean, logvar = self.moments(mel)
        z = self.sample_posterior(mean, logvar, generator) if sample else mean
        return (z - self.config.shift_factor) * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """(B, latent_channels, t) normalised latents → (B, n_mels, t · downsample) log-mel, or its first ``frames``
        frames (the T the latent was encoded from: ``decode(encode(x), x.shape[-1])`` has x's shape)."""
        channels = self.config.latent_channels
        self._check(latent, channels, f"a latent of this VAE's {channels} channels")
        total = latent.shape[-1] * self.config.downsample
        if frames is not None and not 0 < frames <= total:
            raise ValueError(f"a latent of {latent.shape[-1]} frames decodes to {total} mel frames, "
                             f"cannot give {frames}")
        z = latent / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(self.post_quant_conv(z))[..., :frames]

    # ---- model folder: config.json + model.safetensors, local or s3:// -----------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model folder: ``config.json`` ({"format": AUDIO_VAE_FORMAT, "model": AudioVAEConfig with its mel
        config}) and ``model.safetensors``, to a local folder or s3://."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with staged_output(str(path)) as local:
            save_file(state, os.path.join(local, WEIGHTS_FILE))
            config = {"format": AUDIO_VAE_FORMAT, "model": to_dict(self.config)}
            Path(local, CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> AudioVAE:
        """Load a folder written by ``save_pretrained`` (a remote one is cached once per machine: ``local_path``)."""
        from safetensors.torch import load_file

        folder = Path(local_path(str(path)))
        vae = cls(read_audio_vae_config(str(folder)))
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
        vae.load_state_dict(load_file(str(weights)))  # strict: every key and shape
        return vae.to(device, dtype).eval()


def read_audio_vae_config(path: str | os.PathLike, storage: dict | None = None) -> AudioVAEConfig:
    """The ``AudioVAEConfig`` (architecture, mel config, latent scale) of a mel VAE folder, local or s3:// (fsspec
    ``storage`` options over the environment's), from its config.json alone: what curation needs to compute the VAE's
    own features."""
    fs, root = filesystem(str(path), storage)
    config = f"{root}/{CONFIG_FILE}"
    if not fs.exists(config):
        raise FileNotFoundError(f"no {CONFIG_FILE} at {path}: not a mel VAE folder")
    with fs.open(config, "r") as f:
        data = json.load(f)
    if data.get("format") != AUDIO_VAE_FORMAT:
        raise CheckpointError(f"{path}: {CONFIG_FILE} has format {data.get('format')!r}, expected {AUDIO_VAE_FORMAT!r}")
    return from_dict(AudioVAEConfig, data["model"])
