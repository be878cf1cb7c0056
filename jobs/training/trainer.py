"""The driver side of ``jobs.train``: validate everything before any worker starts, build the Ray Train V2 TorchTrainer
(ScalingConfig, RunConfig with storage and name, CheckpointConfig, FailureConfig), run it.

Resume is Ray Train V2's: calling ``fit()`` again with the same RunConfig name and storage path continues from the
latest checkpoint (stack.md; there is no Trainer.restore / resume_from_checkpoint). Inside a run, FailureConfig restarts
the worker group after a failure and the workers resume from the latest checkpoint the same way.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from jobs.training.config import TrainConfig
from jobs.training.data import DataPlan
from models.checkpoint import CheckpointError
from models.config_io import ConfigError, to_dict
from models.storage import filesystem, is_remote, join
from pipelines import constants as C

log = logging.getLogger(__name__)

# Environment the workers need from the driver (object-store credentials, offline switches); passed explicitly because
# Ray workers do not inherit the driver's environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "WANDB_MODE", "WANDB_API_KEY",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def check_storage(uri: str) -> None:
    """Fail early when the storage path cannot be written (a probe object is written and removed)."""
    try:
        fs, path = filesystem(uri)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        if not is_remote(uri):
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise ConfigError(f"storage {uri!r} is not writable: {type(exc).__name__}: {exc}") from exc


def validate(cfg: TrainConfig, write_probe: bool = True) -> DataPlan:
    """Every check that can fail before a worker starts: config values, manifest, buckets, text source, storage."""
    from jobs.training.loop import shards_have_text
    from jobs.training.parallelize import model_config

    cfg.validate()
    try:
        mcfg = model_config(cfg)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from exc
    plan = DataPlan.from_manifest(cfg.data.uri, cfg.data.modality, cfg.data.micro_batch)
    for warning in plan.check(cfg.scaling.workers, cfg.train.grad_accum):
        log.warning(warning)
    first = plan.buckets[plan.shards[0].bucket]
    if first.member != "latent.npy" and not cfg.data.vae:
        raise ConfigError(f"the shards carry {first.member} instead of latents: set data.vae for online VAE encoding")
    if cfg.train.task == "t2i":
        has_text = shards_have_text(plan)
        if not has_text and not cfg.data.text_encoder:
            raise ConfigError("the shards carry no precomputed text features (text.npy): pass --text-encoder")
        if cfg.data.text_features == "shards" and not has_text:
            raise ConfigError("data.text_features=shards but the shards carry no text.npy")
        if has_text and cfg.data.text_features != "online":
            from pipelines.shards import iter_samples, shard_url

            dim = next(iter_samples(shard_url(plan.root, plan.shards[0].path)))["text_features"].shape[-1]
            if dim != mcfg.cap_feat_dim:
                raise ConfigError(f"text features in the shards have {dim} channels; model {cfg.model.preset} "
                                  f"expects cap_feat_dim {mcfg.cap_feat_dim}")
            if not cfg.data.text_encoder and plan.null_text_features() is None:
                log.warning("%s has text features but no %s (an older jobs.prepare) and no --text-encoder was given: "
                            "caption dropout substitutes one zero token for the empty prompt, which the sampler's \"\" "
                            "will not match; pass --text-encoder to encode it", cfg.data.uri, C.NULL_TEXT_FILE)
    latent_channels = first.shape[0] if first.member == "latent.npy" else None
    if latent_channels is not None and latent_channels != mcfg.in_channels:
        raise ConfigError(f"latents have {latent_channels} channels; the model expects {mcfg.in_channels}")
    if write_probe:
        check_storage(cfg.run.storage)
    return plan


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a pyarrow S3 filesystem built from the AWS variables (so a
    custom endpoint such as a local S3 server works), or the absolute local path."""
    if not is_remote(uri):
        return os.path.abspath(uri), None
    if not uri.startswith(("s3://", "s3a://")):
        return uri, None
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return uri.split("://", 1)[1], pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


def build_trainer(cfg: TrainConfig):
    """The TorchTrainer for ``cfg`` (no work starts until ``fit()``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.training.loop import train_loop_per_worker

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ScalingConfig(num_workers=s.workers, use_gpu=s.gpu, resources_per_worker=resources,
                            accelerator_type=s.accelerator_type if s.gpu else None)
    storage_path, storage_fs = ray_storage(cfg.run.storage)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("WANDB_MODE", cfg.logging.wandb if cfg.logging.wandb != "disabled" else "disabled")
    run = RunConfig(
        name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        worker_runtime_env={"env_vars": env},
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config={"config": to_dict(cfg)}, scaling_config=scaling,
                        run_config=run)


def describe(cfg: TrainConfig, plan: DataPlan) -> str:
    """The --dry-run report: model size (built on the meta device), DeepSpeed config, buckets and the data plan."""
    import json

    import torch

    from jobs.training.parallelize import builds_partitioned, deepspeed_config, model_config
    from models import NextDiT

    mcfg = model_config(cfg)
    with torch.device("meta"):
        params = sum(p.numel() for p in NextDiT(mcfg).parameters())
    source = f"from {cfg.model.init_from}" if cfg.model.init_from else f"preset {cfg.model.preset}"
    build = "partitioned across the workers (zero.Init)" if builds_partitioned(cfg) else "whole on each worker"
    lines = [f"model: {source}, {params / 1e6:.2f} M parameters, task {cfg.train.task}"
             + (f", LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "") + f", built {build}",
             (f"workers: {cfg.scaling.workers} ({'GPU' if cfg.scaling.gpu else 'CPU'}), steps {cfg.train.steps}, "
              f"grad_accum {cfg.train.grad_accum}"),
             f"storage: {join(cfg.run.storage, cfg.run.name)}",
             f"data: {cfg.data.uri}: {len(plan.shards)} shards, {len(plan.buckets)} buckets"]
    for name, b in plan.buckets.items():
        per_step = b.micro_batch * cfg.train.grad_accum * cfg.scaling.workers
        lines.append(f"  bucket {name}: shape {list(b.shape)}, {plan.bucket_samples(name)} samples, micro-batch "
                     f"{b.micro_batch}, global batch {per_step}, {plan.bucket_samples(name) // per_step} steps/epoch")
    lines.append("deepspeed: " + json.dumps(deepspeed_config(cfg, cfg.scaling.workers)))
    return "\n".join(lines)


def train(cfg: TrainConfig):
    """Validate, then run (or resume) the training; returns Ray Train's Result."""
    from jobs.runtime import init_ray

    validate(cfg)
    init_ray()
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result
