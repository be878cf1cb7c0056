"""Encode (issue "Stages: encode"): image VAE latents, audio log-mel spectrograms, point samples, optional text features.

Each stage fills the ``tensor`` column with what goes into the sample's tensor member (``constants.*_MEMBER``); without a
VAE the image itself (bucket-sized uint8 HxWx3) is the tensor and is stored as an image file.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from models.config_io import from_dict
from pipelines import constants as C
from pipelines.config import PrepareConfig
from pipelines.ledger import Stage, meta_of


class VaeEncode(Stage):
    """Bucket-sized images → normalised VAE latents (C, H/8, W/8) with ``models.vae.ImageVAE`` (diffusers AutoencoderKL).

    A batch may mix buckets; it is encoded one shape group at a time.
    """

    stage = C.STAGE_ENCODE

    def __init__(self, config: dict, device: str | None = None):
        import torch

        from models.vae import ImageVAE

        cfg = from_dict(PrepareConfig, config).encode
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = ImageVAE.from_pretrained(cfg.vae, cfg.vae_scaling_factor, cfg.vae_shift_factor, device=self.device)
        self.sample = cfg.latent_mode == "sample"
        self.dtype = np.dtype(cfg.latent_dtype)

    def process_rows(self, rows):
        import torch

        groups = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r[C.PAYLOAD].shape].append(i)
        for indices in groups.values():
            images = np.stack([rows[i][C.PAYLOAD] for i in indices])  # (B, H, W, 3) uint8
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
            generator = torch.Generator(self.vae.device).manual_seed(int(rows[indices[0]][C.KEY], 16) % (2**31))
            z = self.vae.encode(x, sample=self.sample, generator=generator).cpu().numpy()  # (B, C, H/8, W/8)
            for j, i in enumerate(indices):
                rows[i][C.TENSOR] = z[j].astype(self.dtype)
                meta_of(rows[i])["latent"] = {"scaling_factor": self.vae.scaling_factor,
                                              "shift_factor": self.vae.shift_factor,
                                              "mode": "sample" if self.sample else "mean"}
        return rows, []


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """float32 mono waveform at SAMPLE_RATE → (N_MELS, frames) float32 natural-log mel spectrogram.

    lumina-reference §14: 16 kHz, n_fft 1024, hop 256, 80 mels (Hann window, centred frames, power 1 magnitudes,
    Slaney-normalised filters, log with a 1e-5 floor — the HiFi-GAN/BigVGAN convention vocoders expect).
    """
    import torch
    import torchaudio.transforms as T

    mel = T.MelSpectrogram(
        sample_rate=C.SAMPLE_RATE, n_fft=C.N_FFT, hop_length=C.HOP_LENGTH, n_mels=C.N_MELS, f_min=C.MEL_FMIN,
        f_max=C.MEL_FMAX, power=1.0, norm="slaney", mel_scale="slaney", center=True,
    )(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)))
    return torch.log(torch.clamp(mel, min=C.LOG_MEL_FLOOR)).numpy().astype(np.float32)


class TensorEncode(Stage):
    """The model-free encodings: log-mel for audio, points as they are, the bucket-sized image when there is no VAE."""

    stage = C.STAGE_ENCODE

    def process_row(self, row):
        modality = row[C.MODALITY]
        if modality == C.AUDIO:
            row[C.TENSOR] = log_mel(row[C.PAYLOAD])
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

    def __init__(self, config: dict, device: str | None = None, output_options: dict | None = None):
        import torch

        from models.text_encoder import TextEncoder

        prepare = from_dict(PrepareConfig, config)
        self.cfg = prepare.encode
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = TextEncoder.from_pretrained(self.cfg.text_encoder, kind=self.cfg.text_encoder_kind,
                                                   layer=self.cfg.text_hidden_layer,
                                                   max_length=self.cfg.text_max_length, device=device)
        self.dtype = np.dtype(self.cfg.text_dtype)
        if prepare.output:
            self.write_null_features(prepare.output, output_options)

    def features(self, captions: list[str]) -> list[np.ndarray]:
        feats, mask = self.encoder.encode(captions)  # (B, L, D), (B, L) right-padded
        feats, lengths = feats.float().cpu().numpy(), mask.sum(-1).cpu().tolist()
        return [f[: int(n)].astype(self.dtype) for f, n in zip(feats, lengths)]

    def write_null_features(self, output: str, options: dict | None) -> None:
        import io

        from pipelines.io import open_fs, write_atomic

        buffer = io.BytesIO()
        np.save(buffer, self.features([""])[0])
        fs, root = open_fs(output, options)
        write_atomic(fs, f"{root}/{C.NULL_TEXT_FILE}", buffer.getvalue())

    def process_rows(self, rows):
        if not rows:
            return rows, []
        for r, f in zip(rows, self.features([str(r[C.CAPTION]) for r in rows])):
            r[C.TEXT_FEATURES] = f
        return rows, []
