"""Image geometry: how pixels, latents and tokens relate, and what sizes are valid. The one place that states it.

A W×H image is encoded by the VAE to a (C, H/8, W/8) latent (every supported AutoencoderKL halves the resolution three
times), and Next-DiT cuts the latent into p×p patches (p = 2 in every preset and in the official models), one token
each: a token covers 8·p = 16 pixels per side. So a valid image side is a positive multiple of 16 for p = 2, and the
official ``image_size`` of a checkpoint is its token grid side × 16 (docs/architecture.md#geometry).
"""

from __future__ import annotations

import re

VAE_DOWNSAMPLE = 8  # pixels per latent cell per side
DEFAULT_PATCH_SIZE = 2  # latent cells per token per side (NextDiTConfig.patch_size)
MAX_SIDE = 2048  # default upper bound on either image side in pixels (SamplerConfig.max_side)


def pixels_per_token(patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    """Pixels per token side: the VAE's downsampling × the patch. Every valid image side is a multiple of it."""
    return VAE_DOWNSAMPLE * patch_size


PIXELS_PER_TOKEN = pixels_per_token()  # 16: the official image_size ↔ token-grid relation


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latent of an H×W image."""
    return height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE


def token_grid(height: int, width: int, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[int, int]:
    """(rows, columns) of tokens of an H×W image."""
    step = pixels_per_token(patch_size)
    return height // step, width // step


def image_size(rows: int, columns: int, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[int, int]:
    """(H, W) in pixels of a token grid."""
    step = pixels_per_token(patch_size)
    return rows * step, columns * step


def check_size(width: int, height: int, max_side: int = MAX_SIDE, patch_size: int = DEFAULT_PATCH_SIZE,
               max_pixels: int | None = None) -> None:
    """Raise ValueError unless both sides are positive multiples of ``pixels_per_token(patch_size)``, at most
    ``max_side``, and (when given) the area at most ``max_pixels``."""
    multiple = pixels_per_token(patch_size)
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < multiple or value % multiple:
            raise ValueError(f"{name} {value} must be a positive multiple of {multiple} pixels")
        if value > max_side:
            raise ValueError(f"{name} {value} exceeds the maximum of {max_side} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"size {width}x{height} has {width * height} pixels, above the maximum of {max_pixels}")


# "WxH" of ASCII digits: `\d`, int() and str.isdigit() also take other scripts' digits ("６４x６４"). The HTTP schema
# publishes the same pattern (serve/schema.py).
SIZE_PATTERN = r"^[0-9]+x[0-9]+$"


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (e.g. '1024x768'; ASCII digits, case and surrounding blanks ignored) → (width, height)."""
    size = str(text).strip().lower()
    if not re.match(SIZE_PATTERN, size):
        raise ValueError(f"size {text!r} is not of the form WIDTHxHEIGHT, e.g. 1024x768")
    w, h = size.split("x")
    return int(w), int(h)
