"""The per-worker training loop (Ray Train V2 ``train_loop_per_worker``) and the tasks that feed it.

Per optimizer step (lumina-reference §3, §7): the loader gives this worker grad_accum micro-batches of one bucket; for
each, the task builds (x1, t, noise, conditioning) with per-sample seeded draws, ``models.flow.flow_matching_loss``
gives the batch loss (sum of per-sample losses / micro-batch), DeepSpeed backpropagates (scaled by 1/grad_accum,
gradients averaged over workers), clips at 2.0 and steps AdamW; then the EMA is updated. So one step's gradient is the
mean over the global batch, whatever the number of workers — which is why a 2-worker run follows a 1-process run.

A task turns samples into model inputs; the loop and the loss are the same for every task. Text-to-image and
class-conditional are here; audio and point clouds plug in by adding a Task to ``TASKS``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from jobs.training import checkpointing
from jobs.training.config import TrainConfig
from jobs.training.data import BucketLoader, DataPlan, LoaderState, sample_seed
from jobs.training.metrics import MetricsSink, Throughput, peak_flops, train_flops
from jobs.training.parallelize import ShardedEMA, build_model, model_config, parallelize
from models.config_io import from_dict, to_dict
from models.flow import (
    caption_keep_mask,
    drop_caption_features,
    drop_captions,
    flow_matching_loss,
    noise_like,
    pad_captions,
    sample_t,
)
from models.presets import NextDiTConfig
from models.storage import filesystem, join
from pipelines import constants as C

log = logging.getLogger(__name__)


class Batch:
    """Model inputs of one micro-batch: x1 (B, C, h, w) fp32 latents, t (B,), noise like x1, and the conditioning."""

    def __init__(self, x1, t, noise, args: tuple, kwargs: dict, caption_tokens: int = 0):
        self.x1, self.t, self.noise, self.args, self.kwargs = x1, t, noise, args, kwargs
        self.caption_tokens = caption_tokens


class Task:
    """Samples → :class:`Batch`. Every random draw of a sample comes from its own generator (data.sample_seed), in a
    fixed order: VAE posterior sample (online VAE only), t, noise, conditioning dropout."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
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

    def conditioning(self, samples: list[dict], gens: list[torch.Generator]) -> tuple[tuple, dict, int]:
        raise NotImplementedError


class TextToImage(Task):
    """Caption features from the shards (text.npy) or from a frozen text encoder; caption dropout from models.flow."""

    def __init__(self, cfg: TrainConfig, device: torch.device, online: bool, plan: DataPlan | None = None):
        super().__init__(cfg, device)
        self.online = online
        self.encoder = None
        if cfg.data.text_encoder:
            from models.text_encoder import TextEncoder

            self.encoder = TextEncoder.from_pretrained(cfg.data.text_encoder, device=device)
        if online and self.encoder is None:
            raise RuntimeError("shards carry no text features: --text-encoder is required")
        self.null = self.null_features(cfg, plan)

    def null_features(self, cfg: TrainConfig, plan: DataPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) features and mask of the empty prompt, which replace dropped captions: from the text encoder when
        there is one, else the null_text.npy that jobs.prepare wrote with the shards' text features, else (outputs of
        older versions) one zero token — which the sampler's "" never produces, so the trainer says so (validate)."""
        if self.encoder is not None:
            feats, mask = self.encoder.encode([""])
            return feats.float().cpu(), mask.cpu()
        stored = plan.null_text_features() if plan is not None else None
        if stored is not None:
            feats = torch.from_numpy(np.asarray(stored, dtype=np.float32))[None]
            return feats, torch.ones(1, feats.shape[1], dtype=torch.bool)
        dim = model_config(cfg).cap_feat_dim
        return torch.zeros(1, 1, dim), torch.ones(1, 1, dtype=torch.bool)

    def conditioning(self, samples, gens):
        prob = self.cfg.flow.caption_dropout
        if self.online:
            captions = [drop_captions([s["caption"]], prob, g)[0] for s, g in zip(samples, gens)]
            feats, mask = self.encoder.encode(captions)
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

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        self.null_class = model_config(cfg).num_classes

    def conditioning(self, samples, gens):
        labels = []
        for s, g in zip(samples, gens):
            keep = bool(caption_keep_mask(1, self.cfg.flow.caption_dropout, g)[0])
            labels.append(int(s["meta"][self.cfg.data.label_key]) if keep else self.null_class)
        return (), {"labels": torch.tensor(labels, device=self.device)}, 0


def make_task(cfg: TrainConfig, plan: DataPlan, device: torch.device) -> Task:
    if cfg.train.task == "class":
        return ClassConditional(cfg, device)
    source = cfg.data.text_features
    online = source == "online" or (source == "auto" and plan.text_feature_width() is None)
    return TextToImage(cfg, device, online, plan)


TASKS = {"t2i": TextToImage, "class": ClassConditional}


# ---------------------------------------------------------------------------------------------------------------------
def training_forward(engine, dtype: torch.dtype, proportional_attn: bool = False):
    """The model call of a training step: the solver-side tensors stay fp32, the model runs in the engine's dtype, with
    the run's proportional-attention switch (train.proportional_attn, off as in the official recipe)."""
    def model(x, t, *args, **kwargs):
        args = tuple(a.to(dtype) if torch.is_floating_point(a) else a for a in args)
        return engine(x.to(dtype), t, *args, proportional_attn=proportional_attn, **kwargs)

    return model


def loss_step(engine, task: Task, micro_batches: list[list[dict]], epoch: int, dtype: torch.dtype):
    """Forward + backward of every micro-batch of one optimizer step; returns (sum of per-sample losses, samples,
    caption tokens of the last micro-batch)."""
    model = training_forward(engine, dtype, task.cfg.train.proportional_attn)
    total, count, caption_tokens = 0.0, 0, 0
    for samples in micro_batches:
        batch = task.build(samples, epoch)
        loss, per_sample = flow_matching_loss(model, batch.x1, *batch.args, t=batch.t, noise=batch.noise,
                                              **batch.kwargs)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += float(per_sample.detach().sum())
        count += len(samples)
        caption_tokens = batch.caption_tokens
    return total, count, caption_tokens


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class SampleRecorder:
    """Test hook (train.record_samples): the keys this rank consumed at every step, one file per attempt."""

    def __init__(self, run_dir: str, rank: int, enabled: bool):
        self.enabled = enabled
        self.path = join(run_dir, "samples", f"{time.time_ns()}-{uuid.uuid4().hex[:6]}-rank{rank}.jsonl")
        self.rows: list[str] = []

    def add(self, step: int, epoch: int, bucket: str, keys: list[str]) -> None:
        if self.enabled:
            self.rows.append(json.dumps({"step": step, "epoch": epoch, "bucket": bucket, "keys": keys}))

    def flush(self) -> None:
        if self.enabled and self.rows:
            fs, path = filesystem(self.path)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "w") as f:
                f.write("\n".join(self.rows) + "\n")


def maybe_fail(cfg: TrainConfig, run_dir: str, step: int, rank: int, world: int) -> None:
    """Test hook: raise once at ``train.fail_at_step`` on one rank; a marker in storage keeps the restart going."""
    fail_rank = cfg.train.fail_rank if cfg.train.fail_rank >= 0 else world - 1
    if cfg.train.fail_at_step != step or rank != fail_rank:
        return
    fs, marker = filesystem(join(run_dir, f"injected-failure-{step}"))
    if fs.exists(marker):
        return
    fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(marker, "w") as f:
        f.write(f"rank {rank} failed after step {step}\n")
    raise RuntimeError(f"injected failure after step {step} on rank {rank} (train.fail_at_step)")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train V2 worker entry point; ``loop_config`` = {"config": TrainConfig as a dict}."""
    import ray.train

    cfg = from_dict(TrainConfig, loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.scaling.gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    run_dir = join(cfg.run.storage, cfg.run.name)
    plan = DataPlan.from_config(cfg.data)

    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else nullcontext(None)) as ckpt_dir:
        saved = checkpointing.read_state(ckpt_dir) if ckpt_dir else None
        same_world = saved is None or saved["world"] == world
        model = build_model(cfg, device, world)
        engine = parallelize(model, cfg, world, load_universal=not same_world)
        ema = ShardedEMA(engine.module, cfg.ema.decay) if cfg.ema.enabled else None
        state = None
        if ckpt_dir:
            checkpointing.load(ckpt_dir, engine, ema, same_world)
            state = LoaderState.from_json(json.dumps(saved["loader"]))
            log.info("rank %d resumed from step %d (saved on %d worker(s), now %d)", rank, saved["step"],
                     saved["world"], world)
    loader = BucketLoader(plan, rank, world, cfg.train.grad_accum, cfg.data.seed, state, cfg.data.cached_shards)
    task = make_task(cfg, plan, device)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    mcfg = model_config(cfg)
    if saved is not None:  # what earlier attempts of this run trained on stays in the record (a resume may change data)
        mcfg = mcfg.trained_on((), mcfg, from_dict(NextDiTConfig, saved["model"]))
    peak = peak_flops(cfg.logging.peak_tflops) if cfg.scaling.gpu else None
    start_step = loader.state.step
    sink = None
    if rank == 0:
        sink = MetricsSink(run_dir, cfg.train.steps, start_step, to_dict(cfg), cfg.logging.wandb,
                           cfg.logging.wandb_project, cfg.run.name, cfg.logging.progress)
    attempt = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}"
    recorder = SampleRecorder(run_dir, rank, cfg.train.record_samples)
    meter = Throughput()
    window_loss, window_count = 0.0, 0

    while loader.state.step < cfg.train.steps:
        step_plan, micro_batches = loader.next()
        step, bucket = step_plan.step, step_plan.bucket
        recorder.add(step, step_plan.epoch, bucket, [s["key"] for mb in micro_batches for s in mb])
        loss_sum, count, caption_tokens = loss_step(engine, task, micro_batches, step_plan.epoch, dtype)
        if ema is not None:
            ema.update()
        tokens = plan.buckets[bucket].tokens(mcfg.patch_size)
        meter.add(count * world, tokens * count * world, train_flops(mcfg, tokens, caption_tokens) * count * world)
        window_loss, window_count = window_loss + loss_sum, window_count + count

        save_now = step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
        if step % cfg.train.log_every == 0 or save_now:
            total, n = all_reduce_sum([window_loss, window_count], device)
            metrics = {"step": step, "epoch": step_plan.epoch, "loss": total / n, "bucket": bucket,
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0), "lr": float(engine.get_lr()[0]),
                       "samples_seen": loader.state.samples, **meter.rates(world, peak)}
            window_loss, window_count = 0.0, 0
            meter.reset()
            if sink is not None:
                sink.log(step, metrics)
                sink.flush(attempt)
            recorder.flush()
            if save_now:
                with tempfile.TemporaryDirectory(prefix="ckpt-") as folder:
                    state = {"step": step, "world": world, "loader": json.loads(loader.state.to_json()),
                             "model": to_dict(mcfg), "lora": cfg.lora.enabled, "encoders": plan.encoders,
                             "training": {"proportional_attn": cfg.train.proportional_attn}}
                    checkpointing.save(folder, engine, ema, state, to_dict(cfg))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=checkpointing.checkpoint_dir_name(step))
            else:
                ray.train.report(metrics)
        if cfg.train.fail_at_step == step:
            recorder.flush()
        maybe_fail(cfg, run_dir, step, rank, world)
    recorder.flush()
    if sink is not None:
        sink.close()
