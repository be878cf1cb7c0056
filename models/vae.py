"""Image VAE: a diffusers ``AutoencoderKL`` loaded from a path, with Lumina's latent scale and shift.

docs/official-formats.md#vae-scaling-factors:
the official model uses the SDXL VAE with z = (sample − shift)·scale, scale 0.13025, shift 0;
training encodes with ``latent_dist.sample()``, decoding runs in fp32. The constants of the known VAEs live here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.geometry import VAE_DOWNSAMPLE

# Known VAE latent normalisations (docs/official-formats.md#vae-scaling-factors); keys are `vae_kind` names.
VAE_LATENT_NORMALISATION: dict[str, tuple[float, float]] = {
    "sdxl": (0.13025, 0.0),
    "sd": (0.18215, 0.0),
    "sd3": (1.5305, 0.0609),
}
DEFAULT_VAE_KIND = "sdxl"


@dataclass
class VAEConfig:
    path: str | None = None
    scaling_factor: float | None = None  # None: the VAE's own config, else the `sdxl` value
    shift_factor: float | None = None


class ImageVAE(torch.nn.Module):
    """Encode images in [-1, 1] to normalised latents and back."""

    def __init__(self, autoencoder: torch.nn.Module, scaling_factor: float, shift_factor: float = 0.0):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ImageVAE":
        """Load an ``AutoencoderKL`` folder. Scale/shift: explicit arguments, else the folder's config, else SDXL's."""
        from diffusers import AutoencoderKL

        from models.storage import local_path

        try:
            autoencoder = AutoencoderKL.from_pretrained(local_path(path), torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot load an AutoencoderKL from {path!r}: {exc}") from exc
        default_scale, default_shift = VAE_LATENT_NORMALISATION[DEFAULT_VAE_KIND]
        own_scale = getattr(autoencoder.config, "scaling_factor", None)
        own_shift = getattr(autoencoder.config, "shift_factor", None)
        scale = scaling_factor if scaling_factor is not None else (own_scale if own_scale is not None else default_scale)
        shift = shift_factor if shift_factor is not None else (own_shift if own_shift is not None else default_shift)
        return cls(autoencoder.to(device), scale, shift)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] → (B,C,H/8,W/8) normalised latents. ``sample`` draws from the posterior (official)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
        if images.shape[-1] % VAE_DOWNSAMPLE or images.shape[-2] % VAE_DOWNSAMPLE:
            raise ValueError(f"image sides must be multiples of {VAE_DOWNSAMPLE}, got {tuple(images.shape[-2:])}")
        posterior = self.autoencoder.encode(images.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images in [0, 1], (B,3,8h,8w), fp32."""
        z = latents.float() / self.scaling_factor + self.shift_factor
        images = self.autoencoder.decode(z.to(self.device, self.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)


def images_to_uint8(images: torch.Tensor) -> list:
    """(B,3,H,W) in [0,1] → list of HxWx3 uint8 numpy arrays."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(array)
