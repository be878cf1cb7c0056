"""Tiny random text encoders, VAE and model folders built locally (never downloaded), for every team's tests.

- ``make_tiny_text_encoder(path)``: a 2-layer Gemma (hidden 32 = the tiny preset's cap_feat_dim) + a WordLevel tokenizer
  that adds <bos> like Gemma's, saved with ``save_pretrained``;
- ``make_tiny_t5(path)``: a 2-layer T5 encoder + a tokenizer that appends </s> like T5's;
- ``make_tiny_vae(path)``: an AutoencoderKL with block_out_channels (8, 8, 16, 16) → /8 downsampling, 4 latent channels;
- ``make_tiny_model_folder(path, text_encoder=..., vae=...)``: a tiny Next-DiT saved in our format with metadata that
  references the text encoder and VAE (and optional sampler defaults); ``preset_name="tiny-class"`` with
  ``class_names=[...]`` gives a class-conditional one.
"""

from __future__ import annotations


import torch

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "at", "by", "to", "from", "under", "over", "near", "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "big", "small", "tiny", "large", "old", "new", "bright", "dark", "cat", "dog", "bird", "fish", "horse", "house", "tree", "car", "boat", "flower", "mountain", "river", "sky", "city", "road", "forest", "beach", "photo", "painting", "drawing", "sketch", "render", "portrait", "landscape", "cinematic", "sunset", "night", "morning"]
TINY_TEXT_DIM = 32  # = preset("tiny").cap_feat_dim


def make_tiny_text_encoder(path, hidden_size: int = TINY_TEXT_DIM, seed: int = 0) -> str:
    """A tiny random GemmaModel + tokenizer over WORDS in ``path`` (built by models/tiny.py); returns the path."""
    from models.tiny import make_tiny_text_encoder as build

    return build(path, hidden_size=hidden_size, seed=seed, words=WORDS)


def make_tiny_t5(path, d_model: int = TINY_TEXT_DIM, seed: int = 0) -> str:
    """A tiny random T5EncoderModel + tokenizer over WORDS in ``path`` (built by models/tiny.py); returns the path."""
    from models.tiny import make_tiny_t5 as build

    return build(path, d_model=d_model, seed=seed, words=WORDS)


def make_tiny_vae(path, seed: int = 0, scaling_factor: float = 0.13025) -> str:
    """A tiny random AutoencoderKL (/8, 4 latent channels) in ``path``; returns the path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=scaling_factor,
    )
    vae.eval().save_pretrained(path)
    return str(path)


def make_tiny_model_folder(path, text_encoder: str | None = None, vae: str | None = None, model=None,
                           sampler: dict | None = None, seed: int = 0, preset_name: str = "tiny",
                           class_names: list[str] | None = None) -> str:
    """A tiny Next-DiT (random non-zero weights of ``preset_name``, e.g. "tiny-class", unless ``model`` is given) saved
    in our format, with metadata ``text_encoder`` / ``vae`` (dicts with a ``path``), optional ``sampler`` defaults and
    optional ``class_names`` (class-conditional models); returns the path."""
    from models import preset
    from tests.helpers import random_nextdit

    if model is None:
        model = random_nextdit(preset(preset_name), seed=seed)
    metadata = {}
    if class_names is not None:
        metadata["class_names"] = list(class_names)
    if text_encoder is not None:
        metadata["text_encoder"] = {"path": str(text_encoder), "kind": "decoder", "layer": -2}
    if vae is not None:
        metadata["vae"] = {"path": str(vae), "scaling_factor": 0.13025, "shift_factor": 0.0}
    if sampler is not None:
        metadata["sampler"] = sampler
    model.save_pretrained(str(path), fmt="ours", metadata=metadata)
    return str(path)
