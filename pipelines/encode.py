"""Encode (issue "Stages: encode"): image VAE latents, audio log-mel spectrograms or mel-VAE latents (paper §5.2), point
samples, optional text features.

Each stage fills the ``tensor`` column with what goes into the sample's tensor member (``constants.*_MEMBER``); without a
VAE the image itself (bucket-sized uint8 HxWx3) is the tensor and is stored as an image file, without a mel VAE the
audio's log-mel spectrogram.

``encoder_records`` gives the VAE / mel-VAE / text-encoder records the manifest and stats.json carry (docs/curation.md
"Encoder records"), read on the driver from each model's config.json; the encode stages check the models they load
against them. ``run_mel`` gives the log-mel parameters of a run's audio: the mel VAE's own, from its record.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.config_io import ConfigError, from_dict, to_dict
from models.mel import MelConfig
from models.storage import filesystem
from pipelines import constants as C
from pipelines.config import EncodeConfig, PrepareConfig, mel_config
from pipelines.io import options_for
from pipelines.stage import Stage, meta_of, structured_caption


# ---- encoder records: what the manifest and stats.json say about the encoders (docs/curation.md) ----------------------
@contextlib.contextmanager
def _config_folder(uri: str, s3_options: dict | None) -> Iterator[str]:
    """A folder (or hub id) to read the model's config.json from: of a remote folder only that file is fetched."""
    from models.storage import is_remote

    if not is_remote(uri):
        yield uri
        return
    fs, root = filesystem(uri, options_for(uri, s3_options))
    with tempfile.TemporaryDirectory(prefix="encoder-config-") as tmp:
        Path(tmp, "config.json").write_bytes(fs.cat_file(f"{root}/config.json"))
        yield tmp


def _read_config(uri: str, s3_options: dict | None, load, key: str, kind: str):
    """``load(folder)`` of the model at ``uri`` (only its config.json is fetched); a ConfigError naming ``key``."""
    try:
        with _config_folder(uri, s3_options) as folder:
            return load(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={uri!r}: cannot read {kind} config.json there ({exc})") from exc


def vae_record(encode: EncodeConfig, s3_options: dict | None = None) -> dict[str, Any] | None:
    """The VAE record of ``encode`` (constants.VAE_RECORD_KEYS), from the folder's config.json alone (no weights), with
    the scale and shift ``models.vae.ImageVAE.from_pretrained`` resolves: the config's explicit values, else the VAE's
    own, else SDXL's. None when no VAE encodes. ``VaeEncode`` checks the model it loads against it."""
    if not (encode.enabled and encode.vae):
        return None
    import inspect

    from diffusers import AutoencoderKL

    from models.vae import DEFAULT_VAE_KIND, VAE_LATENT_NORMALISATION

    own = _read_config(encode.vae, s3_options, AutoencoderKL.load_config, "encode.vae", "an AutoencoderKL")
    # the values a loaded AutoencoderKL has: its __init__ defaults for what config.json leaves out
    params = inspect.signature(AutoencoderKL.__init__).parameters.values()
    own = {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **own}
    default_scale, default_shift = VAE_LATENT_NORMALISATION[DEFAULT_VAE_KIND]

    def first(*values):
        return next(float(v) for v in values if v is not None)

    return {"path": encode.vae,
            "scaling_factor": first(encode.vae_scaling_factor, own.get("scaling_factor"), default_scale),
            "shift_factor": first(encode.vae_shift_factor, own.get("shift_factor"), default_shift),
            "latent_channels": int(own["latent_channels"])}


def text_encoder_record(encode: EncodeConfig, s3_options: dict | None = None) -> dict[str, Any] | None:
    """The text-encoder record of ``encode`` (constants.TEXT_ENCODER_RECORD_KEYS): ``models.text_encoder.describe`` of
    it — the settings that change the features (kind and layer resolved) and the feature width — from config files
    alone; a stack's parts are read the same way. None when no text features are precomputed. ``TextEncode`` checks
    its model against it."""
    if not (encode.enabled and encode.text_encoder):
        return None
    from transformers import AutoConfig

    from models.text_encoder import describe

    def read_config(uri: str):
        return _read_config(uri, s3_options, AutoConfig.from_pretrained, "encode.text_encoder", "a transformers")

    try:
        settings = describe(encode.text_encoder, encode.text_encoder_kind, encode.text_hidden_layer,
                            encode.text_max_length, read_config)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"encode.text_encoder={encode.text_encoder!r}: {exc}") from exc
    return {"path": encode.text_encoder, **settings}


def _audio_vae_fields(path: str, cfg) -> dict[str, Any]:
    """The record (constants.AUDIO_VAE_RECORD_KEYS) of a mel VAE at ``path`` with config ``cfg`` (ours or a diffusers
    one: ``models.audio.audio_vae_config``)."""
    return {"path": path, "format": cfg.format, "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": float(cfg.shift_factor), "latent_channels": int(cfg.latent_channels),
            "latent_rows": int(cfg.latent_rows), "downsample": int(cfg.downsample), "mel": to_dict(cfg.mel)}


def audio_vae_record(encode: EncodeConfig, s3_options: dict | None = None) -> dict[str, Any] | None:
    """The mel-VAE record of ``encode`` (constants.AUDIO_VAE_RECORD_KEYS), from the folder's json files alone
    (``models.audio.audio_vae_config``: ours, a diffusers mel AutoencoderKL, or an AudioLDM pipeline folder): format,
    scale and shift, latent channels and frequency rows, downsampling and the VAE's ``MelConfig``, which the run's
    audio stages then use (``run_mel``). None when no mel VAE encodes; a ConfigError naming ``encode.audio_vae`` when
    the folder is not a mel VAE. ``AudioVaeEncode`` checks its model against it."""
    if not (encode.enabled and encode.audio_vae):
        return None
    from models.audio import audio_vae_config

    try:
        cfg = audio_vae_config(encode.audio_vae, options_for(encode.audio_vae, s3_options))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encode.audio_vae={encode.audio_vae!r}: cannot read a mel VAE config.json there "
                          f"({exc})") from exc
    except (KeyError, TypeError, AttributeError) as exc:  # the right format, but no "model" mapping
        raise ConfigError(f"encode.audio_vae={encode.audio_vae!r}: its config.json is not that of a mel VAE folder "
                          f"(models.audio_vae.AudioVAE.save_pretrained): {type(exc).__name__}: {exc}") from exc
    return _audio_vae_fields(encode.audio_vae, cfg)


def encoder_records(config: PrepareConfig, s3_options: dict | None = None) -> dict[str, dict[str, Any] | None]:
    """``{"vae": record | None, "audio_vae": record | None, "text_encoder": record | None}`` of a run (the VAE only when
    it reads images, the mel VAE only when it reads audio). Raises ConfigError when a configured model has no readable
    config.json, or the mel VAE folder is not one."""
    modalities = config.read.modalities
    vae = vae_record(config.encode, s3_options) if C.IMAGE in modalities else None
    audio_vae = audio_vae_record(config.encode, s3_options) if C.AUDIO in modalities else None
    return {C.MANIFEST_VAE: vae, C.AUDIO_VAE: audio_vae,
            C.MANIFEST_TEXT_ENCODER: text_encoder_record(config.encode, s3_options)}


def run_encoders(modality: str, encoders: dict[str, dict | None]) -> dict[str, dict | None]:
    """What a run with ``encoders`` (``encoder_records``) records on its shards of ``modality``, by manifest column
    (cf. ``shards.shard_encoders``): ``vae`` is the VAE of that modality's latents — the image VAE for images, the mel
    VAE for audio, none for points."""
    vae = {C.IMAGE: encoders.get(C.MANIFEST_VAE), C.AUDIO: encoders.get(C.AUDIO_VAE)}.get(modality)
    return {C.MANIFEST_VAE: vae, C.MANIFEST_TEXT_ENCODER: encoders.get(C.MANIFEST_TEXT_ENCODER)}


def run_mel(encoders: dict[str, dict | None]) -> MelConfig:
    """The log-mel parameters of a run's audio — decode sample rate, bucket frame counts, features: the mel VAE's own
    (its record's ``mel``) with ``encode.audio_vae``, else ``MelConfig()``. So a VAE and its data never disagree."""
    record = encoders.get(C.AUDIO_VAE)
    return mel_config(record["mel"]) if record else MelConfig()


def _check_record(stage: str, expected: dict[str, Any] | None, loaded: dict[str, Any]) -> None:
    if expected is not None and expected != loaded:
        raise RuntimeError(f"{stage}: the model loaded from {loaded['path']!r} is {loaded}, but the run recorded "
                           f"{expected} from its config.json; the manifest would be wrong")


class VaeEncode(Stage):
    """Bucket-sized images → normalised VAE latents (C, H/8, W/8) with ``models.vae.ImageVAE`` (diffusers AutoencoderKL).

    A batch may mix buckets; it is encoded one shape group at a time.
    """

    stage = C.STAGE_ENCODE

    def __init__(self, config: dict, device: str | None = None, record: dict | None = None):
        import torch

        from models.vae import ImageVAE

        cfg = from_dict(PrepareConfig, config).encode
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = ImageVAE.from_pretrained(cfg.vae, cfg.vae_scaling_factor, cfg.vae_shift_factor, device=self.device,
                                            dtype=getattr(torch, cfg.vae_dtype))
        _check_record("VaeEncode", record, {"path": cfg.vae, "scaling_factor": self.vae.scaling_factor,
                                            "shift_factor": self.vae.shift_factor,
                                            "latent_channels": self.vae.latent_channels})
        self.sample = cfg.latent_mode == "sample"
        self.dtype = np.dtype(cfg.latent_dtype)

    def process_rows(self, rows):
        import torch

        groups = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r[C.PAYLOAD].shape].append(i)
        for indices in groups.values():
            images = np.stack([rows[i][C.PAYLOAD] for i in indices])  # (B, H, W, 3) uint8
            # to the VAE's device as uint8 (a quarter of the bytes of floats), scaled there: (B, 3, H, W) in [-1, 1]
            x = torch.from_numpy(images).to(self.vae.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            generator = torch.Generator(self.vae.device).manual_seed(int(rows[indices[0]][C.KEY], 16) % (2**31))
            z = self.vae.encode(x, sample=self.sample, generator=generator).cpu().numpy()  # (B, C, H/8, W/8)
            for j, i in enumerate(indices):
                rows[i][C.TENSOR] = z[j].astype(self.dtype)
                meta_of(rows[i])["latent"] = {"scaling_factor": self.vae.scaling_factor,
                                              "shift_factor": self.vae.shift_factor,
                                              "mode": "sample" if self.sample else "mean"}
        return rows, []


class AudioVaeEncode(Stage):
    """Bucket-sized waveforms → log-mel with the VAE's own ``MelConfig`` → normalised mel-VAE latents in
    ``encode.latent_dtype``: (latent_channels, ⌈frames / downsample⌉) with our ``models.audio_vae.AudioVAE`` (paper
    §5.2), (latent_channels, rows, ⌈frames / downsample⌉) with a 2D one (``models.audioldm.AudioLDMVAE``); the folder
    kind is ``models.audio.load_audio_vae``'s. The json's ``latent`` entry has the scale and shift, the mode and
    ``mel_frames``, the frame count to crop a decoded latent back to (``vae.decode(latent, frames=mel_frames)``).

    A batch may mix buckets; it is encoded one length at a time."""

    stage = C.STAGE_ENCODE

    def __init__(self, config: dict, device: str | None = None, record: dict | None = None):
        import torch

        from models.audio import load_audio_vae

        cfg = from_dict(PrepareConfig, config).encode
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = load_audio_vae(cfg.audio_vae, device=self.device)  # s3:// → the local cache
        _check_record("AudioVaeEncode", record, _audio_vae_fields(cfg.audio_vae, self.vae.config))
        self.sample = cfg.latent_mode == "sample"
        self.dtype = np.dtype(cfg.latent_dtype)

    def process_rows(self, rows):
        import torch

        from models import mel

        groups = defaultdict(list)
        for i, r in enumerate(rows):
            groups[len(r[C.PAYLOAD])].append(i)
        vae = self.vae.config
        for indices in groups.values():
            waves = torch.from_numpy(np.stack([np.asarray(rows[i][C.PAYLOAD], np.float32) for i in indices]))
            spectra = mel.log_mel(waves.to(self.device), vae.mel)  # (B, n_mels, frames)
            # the posterior's noise is drawn on the CPU (AudioVAE.sample_posterior), so every device agrees
            generator = torch.Generator().manual_seed(int(rows[indices[0]][C.KEY], 16) % (2**31))
            z = self.vae.encode(spectra, sample=self.sample, generator=generator).float().cpu().numpy()
            for j, i in enumerate(indices):
                rows[i][C.TENSOR] = z[j].astype(self.dtype)
                meta_of(rows[i])["latent"] = {"scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
                                              "mode": "sample" if self.sample else "mean",
                                              "mel_frames": int(spectra.shape[-1])}
        return rows, []


def log_mel(waveform: np.ndarray, cfg: MelConfig | None = None) -> np.ndarray:
    """float32 mono waveform at ``cfg.sample_rate`` → (n_mels, frames) float32 natural-log mel spectrogram, computed by
    ``models.mel.log_mel`` (docs/design-decisions.md#log-mel-features; default ``MelConfig()``: 16 kHz, n_fft 1024,
    hop 256, 80 mels)."""
    import torch

    from models import mel

    wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    return mel.log_mel(wave, cfg or MelConfig()).numpy().astype(np.float32)


class TensorEncode(Stage):
    """The model-free encodings: log-mel for audio (with the run's ``mel`` parameters: ``run_mel``), points as they
    are, the bucket-sized image when there is no VAE."""

    stage = C.STAGE_ENCODE

    def __init__(self, mel: dict | None = None):
        self.mel = mel_config(mel)

    def process_row(self, row):
        modality = row[C.MODALITY]
        if modality == C.AUDIO:
            row[C.TENSOR] = log_mel(row[C.PAYLOAD], self.mel)
        else:
            row[C.TENSOR] = np.ascontiguousarray(row[C.PAYLOAD])
        return row


class TextEncode(Stage):
    """Captions → precomputed text features (L, D), padding removed (``text.npy``), computed by ``models.text_encoder``
    — the same tokenizer settings, hidden layer and empty-prompt handling as the trainer and the sampler use online, so
    precomputed and online features are equal. An empty caption gets the empty prompt's features (what the trainer
    encodes for it).

    The empty prompt's features are also written once to ``OUTPUT/null_text.npy``: caption dropout (official: the
    caption becomes "") swaps them in, so a trainer that reads precomputed features needs no text encoder of its own.
    Every actor writes the same bytes atomically, so concurrent actors and reruns are harmless."""

    stage = "text_encode"

    def __init__(self, config: dict, device: str | None = None, output_options: dict | None = None,
                 record: dict | None = None):
        import torch

        from models.text_encoder import TextEncoder

        prepare = from_dict(PrepareConfig, config)
        self.cfg = prepare.encode
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = TextEncoder.from_pretrained(self.cfg.text_encoder, kind=self.cfg.text_encoder_kind,
                                                   layer=self.cfg.text_hidden_layer,
                                                   max_length=self.cfg.text_max_length, device=device)
        e = self.encoder
        _check_record("TextEncode", record, {"path": self.cfg.text_encoder, "kind": e.kind, "layer": e.layer,
                                             "max_length": e.max_length, "pad_to_multiple_of": e.pad_to_multiple_of,
                                             "hidden_size": e.hidden_size})
        self.dtype = np.dtype(self.cfg.text_dtype)
        if prepare.output:
            self.write_null_features(prepare.output, output_options)

    def features(self, captions: list[str], structured: list[str] | None = None) -> list[np.ndarray]:
        """Unpadded (L, D) features of each caption; a stack's structured-caption parts read ``structured``."""
        feats, mask = self.encoder.encode(captions, structured)  # (B, L, D), (B, L) right-padded
        feats, lengths = feats.float().cpu().numpy(), mask.sum(-1).cpu().tolist()
        return [f[: int(n)].astype(self.dtype) for f, n in zip(feats, lengths)]

    def write_null_features(self, output: str, options: dict | None) -> None:
        import io

        from pipelines.io import write_atomic

        buffer = io.BytesIO()
        np.save(buffer, self.features([""])[0])
        fs, root = filesystem(output, options)
        write_atomic(fs, f"{root}/{C.NULL_TEXT_FILE}", buffer.getvalue())

    def process_rows(self, rows):
        if not rows:
            return rows, []
        captions = [str(r[C.CAPTION]) for r in rows]
        structured = [structured_caption(meta_of(r).get(C.STRUCTURED_CAPTION), c) for r, c in zip(rows, captions)]
        for r, f in zip(rows, self.features(captions, structured)):
            r[C.TEXT_FEATURES] = f
        return rows, []
