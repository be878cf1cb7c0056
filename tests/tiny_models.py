"""Tiny random text encoders, VAE and model folders built locally (never downloaded), for every team's tests.

They live in models/tiny.py (the serve benchmark and the demo build them too, and tests/ is not in the image); this
module is the tests' name for them:

- ``make_tiny_text_encoder(path)``: a 2-layer Gemma (hidden 32 = the tiny preset's cap_feat_dim) + a WordLevel tokenizer
  over ``models.tiny.BASE_WORDS`` that adds <bos> like Gemma's, saved with ``save_pretrained``;
- ``make_tiny_t5(path)``: a 2-layer T5 encoder + a tokenizer that appends </s> like T5's;
- ``make_tiny_vae(path)``: an AutoencoderKL with block_out_channels (8, 8, 16, 16) → /8 downsampling, 4 latent channels;
- ``make_tiny_model_folder(path, text_encoder=..., vae=...)``: a tiny Next-DiT saved in our format with metadata that
  references the text encoder and VAE (and optional sampler defaults); ``preset_name="tiny-class"`` with
  ``class_names=[...]`` gives a class-conditional one.
"""

from __future__ import annotations

from models.tiny import (  # noqa: F401
    make_tiny_model_folder,
    make_tiny_t5,
    make_tiny_text_encoder,
    make_tiny_vae,
)
