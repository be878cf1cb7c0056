"""Training tasks: a task turns a micro-batch of shard samples into model inputs (``Batch``); the loop, the loss and
the parallelism are the same for every task (loop.py).

A task is a ``Task`` subclass registered in ``TASKS`` under the name ``train.task`` selects (``auto``, the default:
the one whose modality and conditioning are the model's); its constructor takes ``(cfg, catalog, device)``.
Text-to-image (``t2i``: caption features from the shards or a frozen text encoder), class-conditional (``class``:
labels from the samples' metadata), text-to-audio (``t2a``: mel-VAE latent frames) and point clouds (``t2p`` and
``class-points``: the points themselves) are here; a new modality is a new subclass and one registry entry.

Every random draw of a sample comes from its own generator, seeded by (train.seed, epoch, sample key)
(``data.sample_seed``), in a fixed order — VAE posterior sample (online VAE only), t, noise, conditioning dropout — so a
sample's draws do not depend on which worker reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from jobs.training.config import TrainJobConfig
from jobs.training.data import ShardCatalog, sample_seed
from jobs.training.parallelize import model_config
from models.config_io import ConfigError
from models.flow import caption_keep_mask, drop_caption_features, noise_like, pad_captions, sample_t
from pipelines import constants as C


class Batch:
    """Model inputs of one micro-batch: x1 (B, C, h, w) fp32 latents, t (B,), noise like x1, and the conditioning."""

    def __init__(self, x1, t, noise, args: tuple, kwargs: dict, caption_tokens: int = 0):
        self.x1, self.t, self.noise, self.args, self.kwargs = x1, t, noise, args, kwargs
        self.caption_tokens = caption_tokens


class Task(ABC):
    """Samples → :class:`Batch`. Every random draw of a sample comes from its own generator (data.sample_seed), in a
    fixed order: VAE posterior sample (online VAE only), t, noise, conditioning dropout. ``modality`` and
    ``conditioned_on`` say which models the task trains (``task_for`` picks the task of a model)."""

    modality = "image"
    conditioned_on = "text"

    def __init__(self, cfg: TrainJobConfig, catalog: ShardCatalog, device: torch.device):
        self.cfg, self.catalog, self.device = cfg, catalog, device
        self.vae = None
        if cfg.data.vae:
            from models.vae import ImageVAE

            self.vae = ImageVAE.from_pretrained(cfg.data.vae, device=device)

    def latents(self, sample: dict, gen: torch.Generator) -> torch.Tensor:
        tensor = sample["tensor"]
        if sample["meta"].get("member", C.LATENT_MEMBER) == C.LATENT_MEMBER:
            return torch.from_numpy(np.asarray(tensor, dtype=np.float32))
        if self.vae is None:  # the driver checks this before any worker starts
            raise RuntimeError("shards carry images, not latents: set data.vae for online VAE encoding")
        image = torch.tensor(np.asarray(tensor)).permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, H, W), a copy
        return self.vae.encode(image.to(self.device), sample=True, generator=gen)[0].float().cpu()

    def build(self, samples: list[dict], epoch: int) -> Batch:
        gens = [torch.Generator().manual_seed(sample_seed(self.cfg.train.seed, epoch, s["key"])) for s in samples]
        x1 = [self.latents(s, g) for s, g in zip(samples, gens)]
        t = torch.cat([sample_t(1, self.cfg.flow, g) for g in gens])
        noise = torch.stack([noise_like(x, g) for x, g in zip(x1, gens)])
        args, kwargs, caption_tokens = self.conditioning(samples, gens)
        return Batch(torch.stack(x1).to(self.device), t.to(self.device), noise.to(self.device), args, kwargs,
                     caption_tokens)

    @abstractmethod
    def conditioning(self, samples: list[dict], gens: list[torch.Generator]) -> tuple[tuple, dict, int]:
        """(model args, model keyword args, mean caption tokens) of the micro-batch's conditioning."""


class TextToImage(Task):
    """Caption features from the shards (text.npy) or from a frozen text encoder; caption dropout from models.flow."""

    def __init__(self, cfg: TrainJobConfig, catalog: ShardCatalog, device: torch.device):
        super().__init__(cfg, catalog, device)
        source = cfg.data.text_features
        self.online = online = source == "online" or (source == "auto" and catalog.text_feature_width() is None)
        self.encoder = None
        if cfg.data.text_encoder:
            from models.text_encoder import TextEncoder

            self.encoder = TextEncoder.from_pretrained(cfg.data.text_encoder, device=device)
        if online and self.encoder is None:
            raise RuntimeError("shards carry no text features: --text-encoder is required")
        self.null = self.null_features(cfg, catalog)

    def null_features(self, cfg: TrainJobConfig, catalog: ShardCatalog) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) features and mask of the empty prompt, which replace dropped captions: from the text encoder when
        there is one, else the null_text.npy that jobs.prepare wrote with the shards' text features, else (outputs of
        older versions) one zero token — which the sampler's "" never produces, so the trainer says so (validate)."""
        if self.encoder is not None:
            feats, mask = self.encoder.encode([""])
            return feats.float().cpu(), mask.cpu()
        stored = catalog.null_text_features()
        if stored is not None:
            feats = torch.from_numpy(np.asarray(stored, dtype=np.float32))[None]
            return feats, torch.ones(1, feats.shape[1], dtype=torch.bool)
        dim = model_config(cfg).cap_feat_dim
        return torch.zeros(1, 1, dim), torch.ones(1, 1, dtype=torch.bool)

    def conditioning(self, samples, gens):
        prob = self.cfg.flow.caption_dropout
        if self.online:
            # one draw per sample drops its caption and its structured caption (a stack's second text) together
            keep = [bool(caption_keep_mask(1, prob, g)[0]) for g in gens]
            captions = [s["caption"] if k else "" for s, k in zip(samples, keep)]
            structured = [(s["meta"].get(C.STRUCTURED_CAPTION) or s["caption"]) if k else ""
                          for s, k in zip(samples, keep)]
            feats, mask = self.encoder.encode(captions, structured)
            feats, mask = feats.float(), mask.bool()
        else:
            rows = []
            for s, g in zip(samples, gens):
                f = s.get("text_features")
                if f is None or len(f) == 0:  # an empty caption: the empty prompt (still draws, to keep g in step)
                    f_t, m_t = self.null
                else:
                    f_t = torch.from_numpy(np.asarray(f, dtype=np.float32))[None]
                    m_t = torch.ones(1, f_t.shape[1], dtype=torch.bool)
                rows.append(drop_caption_features(f_t, m_t, *self.null, prob=prob, generator=g))
            length = max(f.shape[1] for f, _ in rows)
            padded = [pad_captions(f, m, length) for f, m in rows]
            feats, mask = torch.cat([f for f, _ in padded]), torch.cat([m for _, m in padded])
        return (feats.to(self.device), mask.to(self.device)), {}, int(mask.sum(1).float().mean())


class ClassConditional(Task):
    """Class labels from the sample's json metadata; dropped to the null class (index num_classes) like captions."""

    conditioned_on = "class"

    def __init__(self, cfg: TrainJobConfig, catalog: ShardCatalog, device: torch.device):
        super().__init__(cfg, catalog, device)
        self.null_class = model_config(cfg).num_classes

    def conditioning(self, samples, gens):
        labels = []
        for s, g in zip(samples, gens):
            keep = bool(caption_keep_mask(1, self.cfg.flow.caption_dropout, g)[0])
            labels.append(int(s["meta"][self.cfg.data.label_key]) if keep else self.null_class)
        return (), {"labels": torch.tensor(labels, device=self.device)}, 0


class TextToAudio(TextToImage):
    """Text-to-audio and text-to-music (paper §5.2): mel-VAE latents from the shards — our VAE's (C, T), given to the
    model as one row of latent frames (C, 1, T) so Next-DiT runs 1D RoPE over time, or a 2D mel VAE's (C, F, T) as
    they are, 2D RoPE over frequency × time; captions exactly as for images."""

    modality = "audio"

    def latents(self, sample: dict, gen: torch.Generator) -> torch.Tensor:
        if sample["meta"].get("member", C.LATENT_MEMBER) != C.LATENT_MEMBER:  # the driver checks this first
            raise RuntimeError("audio shards carry log-mel spectrograms, not latents: prepare them with "
                               "--set encode.audio_vae=PATH")
        latent = torch.from_numpy(np.asarray(sample["tensor"], dtype=np.float32))
        return latent if latent.ndim == 3 else latent[:, None, :]


class PointClouds:
    """Point clouds (paper §5.3): a sample's (N, 3) points as the model input (3, 1, N), one token per point (a mixin
    before the conditioning's task: captions as for images, or labels as for the class-conditional task)."""

    modality = "points"

    def latents(self, sample: dict, gen: torch.Generator) -> torch.Tensor:
        points = torch.from_numpy(np.asarray(sample["tensor"], dtype=np.float32))  # (N, 3)
        return points.T[:, None, :].contiguous()


class TextToPoints(PointClouds, TextToImage):
    """Text-conditioned point clouds (the paper's Cap3D model)."""


class LabelToPoints(PointClouds, ClassConditional):
    """Label-conditioned point clouds (the paper's ShapeNet model): labels from the samples' json, as ``class``."""


# The registry ``train.task`` names (config validation checks against its keys; "auto" is ``task_for``'s choice).
TASKS: dict[str, type[Task]] = {"t2i": TextToImage, "class": ClassConditional, "t2a": TextToAudio,
                                "t2p": TextToPoints, "class-points": LabelToPoints}


def task_for(modality: str, conditioning: str) -> str:
    """The registered task that trains models of this modality and conditioning."""
    names = [name for name, task in TASKS.items() if (task.modality, task.conditioned_on) == (modality, conditioning)]
    if not names:
        raise ConfigError(f"no training task for a {conditioning}-conditioned {modality} model")
    return names[0]


def make_task(cfg: TrainJobConfig, catalog: ShardCatalog, device: torch.device) -> Task:
    """The task of ``train.task`` for this run's data, on ``device``."""
    return TASKS[cfg.train.task](cfg, catalog, device)
