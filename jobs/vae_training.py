"""Small-VAE training with Ray Train (library side of ``python -m jobs.train_vae``).

Ray Train (DDP over gloo on CPU, NCCL on GPU) trains reconstruction + a small KL term on random crops of the images; rank 0
then measures the latent standard deviation over the data and saves the VAE with ``scaling_factor = 1/std`` (the "scale by
std" rule), so its latents enter the flow model with unit variance, as SDXL's 0.13025 does for the SDXL VAE. Lives in an
importable module (not the ``-m`` entry point) so Ray workers unpickle the config class by reference.
"""


from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from models.config_io import ConfigError, from_dict, to_dict

log = logging.getLogger("jobs.train_vae")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class TinyVAEArchitecture:
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)  # 4 levels: ×8 downsampling, like the SDXL VAE
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16


@dataclass
class TrainVAEConfig:
    data: str = ""
    output: str = ""
    workers: int = 2
    use_gpu: bool = False
    steps: int = 1500
    batch_size: int = 16  # per worker
    crop: int = 64  # random crops: the VAE is convolutional, crops train it for every size
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    log_every: int = 100
    architecture: TinyVAEArchitecture = field(default_factory=TinyVAEArchitecture)

    def __post_init__(self):
        if not self.data or not self.output:
            raise ConfigError("train_vae needs --data and --output")
        if self.workers < 1 or self.steps < 1 or self.batch_size < 1:
            raise ConfigError("workers, steps and batch_size must be ≥ 1")


def list_images(folder: str) -> list[str]:
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def load_images(paths: list[str]) -> list:
    """Decodable images as (3, H, W) tensors in [-1, 1]; undecodable files are skipped with a warning."""
    import numpy as np
    import torch
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1
        except Exception as exc:  # noqa: BLE001 - a corrupt image must not stop training
            log.warning("skipping %s: %s", path, exc)
            continue
        images.append(torch.from_numpy(array).permute(2, 0, 1))
    return images


def build_vae(arch: TinyVAEArchitecture):
    from diffusers import AutoencoderKL

    levels = len(arch.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
        block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=arch.norm_num_groups,
    )


def random_crops(images: list, batch: int, crop: int, generator):
    import torch

    picks = torch.randint(len(images), (batch,), generator=generator)
    out = []
    for index in picks.tolist():
        image = images[index]
        _, h, w = image.shape
        y = int(torch.randint(h - crop + 1, (1,), generator=generator))
        x = int(torch.randint(w - crop + 1, (1,), generator=generator))
        out.append(image[:, y:y + crop, x:x + crop])
    return torch.stack(out)


def train_worker(config_dict: dict) -> None:
    """Ray Train worker loop (DDP)."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train.torch import prepare_model

    cfg = from_dict(TrainVAEConfig, config_dict)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vae = build_vae(cfg.architecture)
    model = prepare_model(vae)
    images = [img for img in load_images(list_images(cfg.data)) if min(img.shape[1:]) >= cfg.crop]
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * rank)  # different crops per rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    device = next(model.parameters()).device
    module = model.module if hasattr(model, "module") else model
    for step in range(1, cfg.steps + 1):
        batch = random_crops(images, cfg.batch_size, cfg.crop, generator).to(device)
        posterior = module.encode(batch).latent_dist
        reconstruction = module.decode(posterior.sample()).sample
        recon = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / batch[0].numel()
        loss = recon + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            ray.train.report({"step": step, "loss": float(loss), "recon_mse": float(recon)})
    if rank == 0:
        save_with_latent_scale(module, images, cfg)



def save_with_latent_scale(vae, images: list, cfg: TrainVAEConfig) -> None:
    """Scale by std: scaling_factor = 1/std of the latent means over (up to 256 of) the training images."""
    import torch

    from models.storage import filesystem, is_remote

    with torch.no_grad():
        latents = [vae.encode(img[None]).latent_dist.mode() for img in images[:256]]
    std = float(torch.cat([z.flatten() for z in latents]).std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=0.0)
    log.info("latent std %.4f → scaling_factor %.4f", std, 1.0 / std)
    if is_remote(cfg.output):
        with tempfile.TemporaryDirectory() as tmp:
            vae.save_pretrained(tmp)
            fs, path = filesystem(cfg.output)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    else:
        vae.save_pretrained(cfg.output)


def run(cfg: TrainVAEConfig) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.runtime import init_ray

    init_ray()
    storage = tempfile.mkdtemp(prefix="train-vae-")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="train-vae", storage_path=storage),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
