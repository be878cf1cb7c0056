"""Training objective of the mel VAE (paper §5.2): reconstruction, KL and a multi-window discriminator.

Paper §5.2: "a multi-window discriminator learns to distinguish the generated samples from real ones in different
multi-receptive fields of mel-spectrograms"; the rest is ours (docs/design-decisions.md#mel-vae), the
latent-diffusion KL-autoencoder recipe without its perceptual term::

    L_VAE = |x − x̂|₁ + w_kl · KL(q(z|x) ‖ N(0, I)) + [step ≥ disc_start] · w_adv · λ · (−D(x̂))
    L_D   = [step ≥ disc_start] · ½ (relu(1 − D(x)) + relu(1 + D(x̂)))                      (hinge)

|x − x̂|₁ is the mean over mel elements; KL the sum over a clip's latent elements divided by its mel elements (so w_kl
has the latent-diffusion scale, 1e-6); λ = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4) at the decoder's last weight W, clamped
to [0, 10⁴]. D(x) is the mean of the window discriminators' logits: each looks at a random window of its own length.

A training step (two optimizers, as in the official recipe)::

    loss, recon, logs = vae_loss(vae, disc, mel, step, cfg)
    opt_vae.zero_grad(); loss.backward(); opt_vae.step()
    d_loss, d_logs = discriminator_loss(disc, mel, recon, step, cfg)
    opt_disc.zero_grad(); d_loss.backward(); opt_disc.step()     # zero_grad drops what L_VAE left in D
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.config_io import ConfigError


@dataclass
class DiscriminatorConfig:
    windows: tuple[int, ...] = (32, 64, 128)  # mel frames each window discriminator sees (0.5, 1, 2 s at 16 kHz)
    channels: int = 64
    layers: int = 3  # stride-2 convolutions per window discriminator

    def __post_init__(self):
        if not self.windows or min(self.windows) < 1 or self.channels < 1 or self.layers < 1:
            raise ConfigError(f"windows (≥ 1 frame each), channels and layers must be positive, got {self}")


@dataclass
class AudioVAELossConfig:
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.5  # w_adv, times the adaptive λ
    disc_start: int = 50_001  # the step from which D is trained and L_VAE has its adversarial term
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


# ---- the multi-window discriminator ----------------------------------------------------------------------------------
class WindowDiscriminator(nn.Module):
    """(B, 1, n_mels, w) → (B,) logits: 3×3 stride-2 convolutions with LeakyReLU(0.2), a 3×3 convolution to one
    channel, the mean of that patch map."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        convs, c_in = [], 1
        for _ in range(layers):
            convs += [nn.Conv2d(c_in, channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = channels
        self.net = nn.Sequential(*convs, nn.Conv2d(c_in, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class MultiWindowDiscriminator(nn.Module):
    """(B, n_mels, T) log-mel → (B, windows) logits, one per window length (paper §5.2). Window discriminator i sees
    frames [s_i, s_i + min(w_i, T)) of every clip, s_i random: any clip length works, a short clip is seen whole."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = config or DiscriminatorConfig()
        self.discriminators = nn.ModuleList(WindowDiscriminator(self.config.channels, self.config.layers)
                                            for _ in self.config.windows)

    def random_starts(self, frames: int, generator: torch.Generator | None = None) -> list[int]:
        """A random first frame for each window in a clip of ``frames`` frames."""
        return [int(torch.randint(frames - min(w, frames) + 1, (1,), generator=generator))
                for w in self.config.windows]

    def forward(self, mel: torch.Tensor, starts: list[int] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if mel.ndim != 3:
            raise ValueError(f"expected a log-mel batch (B, n_mels, frames), got shape {tuple(mel.shape)}")
        frames = mel.shape[-1]
        starts = self.random_starts(frames, generator) if starts is None else starts
        logits = [disc(mel[:, None, :, s:s + min(w, frames)])
                  for disc, w, s in zip(self.discriminators, self.config.windows, starts)]
        return torch.stack(logits, dim=1)


# ---- the loss terms --------------------------------------------------------------------------------------------------
def reconstruction_loss(mel: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """|x − x̂|₁, the mean over every mel element."""
    return (mel - reconstruction).abs().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, mel_elements: int) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) = ½ Σ (mean² + exp(logvar) − 1 − logvar) over a clip's latent, averaged over
    the batch, divided by ``mel_elements`` (n_mels × frames of one clip)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / mel_elements


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def hinge_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """λ = ‖∇_W rec‖ / (‖∇_W adv‖ + 1e-4), clamped to [0, max_weight], no gradient: the adversarial term pulls on the
    decoder's last weight W about as hard as the reconstruction does."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---- what a training step calls --------------------------------------------------------------------------------------
def vae_loss(vae: nn.Module, discriminator: MultiWindowDiscriminator, mel: torch.Tensor, step: int,
             cfg: AudioVAELossConfig, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """L_VAE of a batch ``mel`` (B, n_mels, T) for an ``AudioVAE`` (or a DistributedDataParallel of one: its
    ``module`` gives the last layer): (loss, reconstruction, logged floats)."""
    reconstruction, mean, logvar = vae(mel, sample=True, generator=generator)
    rec = reconstruction_loss(mel, reconstruction)
    kl = kl_loss(mean, logvar, mel[0].numel())
    loss = rec + cfg.kl_weight * kl
    logs = {"rec_l1": float(rec.detach()), "kl": float(kl.detach())}
    if step >= cfg.disc_start:
        adv = hinge_generator_loss(discriminator(reconstruction, generator=generator))
        weight = cfg.adversarial_weight * adaptive_weight(rec, adv, getattr(vae, "module", vae).last_layer)
        loss = loss + weight * adv
        logs.update(adv=float(adv.detach()), adv_weight=float(weight))
    logs["loss"] = float(loss.detach())
    return loss, reconstruction, logs


def discriminator_loss(discriminator: MultiWindowDiscriminator, mel: torch.Tensor, reconstruction: torch.Tensor,
                       step: int, cfg: AudioVAELossConfig, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D on real ``mel`` and (detached) ``reconstruction``, both seen through the same random windows; zero before
    ``cfg.disc_start``. Returns (loss, logged floats). ``discriminator`` may be a DistributedDataParallel of one."""
    starts = getattr(discriminator, "module", discriminator).random_starts(mel.shape[-1], generator)
    real = discriminator(mel.detach(), starts)
    fake = discriminator(reconstruction.detach(), starts)
    factor = 1.0 if step >= cfg.disc_start else 0.0
    loss = factor * hinge_discriminator_loss(real, fake)
    return loss, {"d_loss": float(loss.detach()), "logits_real": float(real.detach().mean()),
                  "logits_fake": float(fake.detach().mean())}
