"""The driver side of ``jobs.train``: validate everything before any worker starts, build the Ray Train V2 TorchTrainer
(ScalingConfig, RunConfig with storage and name, CheckpointConfig, FailureConfig), run it.

Resume is Ray Train V2's: calling ``fit()`` again with the same RunConfig name and storage path continues from the
latest checkpoint (docs/architecture.md#stack-pitfalls: there is no Trainer.restore / resume_from_checkpoint). Inside a
run, FailureConfig restarts the worker group after a failure and the workers resume from the latest checkpoint the
same way.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from jobs.training.config import TrainJobConfig
from jobs.training.data import ShardCatalog
from jobs.training.parallelize import model_config
from models.config_io import ConfigError, to_dict
from models.formats import CheckpointError
from models.presets import NextDiTConfig
from models.storage import filesystem, is_remote, join
from pipelines import constants as C

log = logging.getLogger(__name__)

# The driver's non-secret switches the workers get through their runtime env (Ray workers inherit their node's
# environment, not the driver's). Runtime-env env_vars show in the Ray dashboard, the job's metadata and the runtime-env
# logs, so no credential travels this way: AWS keys, WANDB_API_KEY and HF_TOKEN come from each node's own environment
# (KubeRay secretRef, IRSA or an instance profile, the launcher's env; docs/training.md#credentials-on-a-cluster). A
# forwarded AWS_ACCESS_KEY_ID without its secret would also break the node's own credential chain.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


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


def validate(cfg: TrainJobConfig, write_probe: bool = True) -> ShardCatalog:
    """Every check that can fail before a worker starts: config values, manifest, buckets, text source, storage, the
    in-training evaluation's prompts and encoders. Sets ``cfg.model.resolved``, the architecture every worker builds
    (resolved here once), and reads ``eval.prompt_file`` into ``eval.prompts``."""
    cfg.validate()
    if write_probe:
        check_storage(cfg.run.storage)
    keep_global_batch(cfg, storage_checked=write_probe)
    cfg.model.resolved = None  # a config saved by an earlier run carries its resolution: resolve again
    base = base_model(cfg)
    resolve_modality(cfg, base)
    catalog = ShardCatalog.from_config(cfg.data)
    base = resolve_task(cfg, base, catalog)
    for warning in catalog.check(cfg.scaling.workers, cfg.train.grad_accum):
        log.warning(warning)
    first = catalog.buckets[catalog.shards[0].bucket]
    if first.member == C.MEL_MEMBER:
        raise ConfigError("the audio shards carry log-mel spectrograms (mel.npy), not latents: prepare them with "
                          "--set encode.audio_vae=PATH (a mel VAE: python -m jobs.train_vae --modality audio)")
    points = first.member == C.POINTS_MEMBER  # a points model on point shards (resolve_task checks the modality)
    if first.member not in (C.LATENT_MEMBER, C.POINTS_MEMBER) and not cfg.data.vae:
        raise ConfigError(f"the shards carry {first.member} instead of latents: set data.vae for online VAE encoding")
    cfg.model.resolved = mcfg = resolve_model(cfg, catalog, base)
    latent_channels = first.shape[0] if first.member == C.LATENT_MEMBER else (first.shape[1] if points else None)
    if latent_channels is not None and latent_channels != mcfg.in_channels:
        raise ConfigError(f"latents have {latent_channels} channels; the model expects {mcfg.in_channels}")
    if mcfg.modality == C.AUDIO and latent_channels is not None:  # (C, T): 1D RoPE; a 2D mel VAE's (C, F, T) 2D RoPE
        from models.audio import check_audio_latents

        rows = first.shape[1] if len(first.shape) == 3 else 1
        check_audio_latents(mcfg, latent_channels, rows, f"the audio shards (latent shape {list(first.shape)})")
    check_encoders(cfg, catalog)
    from jobs.training.evaluation import check_eval

    check_eval(cfg, catalog.encoders, mcfg)
    return catalog


def base_model(cfg: TrainJobConfig) -> NextDiTConfig:
    """The architecture before the data refines it: ``model.init_from``'s, or the preset with its overrides."""
    try:
        return model_config(cfg)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from exc


def resolve_modality(cfg: TrainJobConfig, mcfg: NextDiTConfig) -> None:
    """Set ``data.modality`` when it is "auto" (the model's) and check that the model and the data agree."""
    if cfg.data.modality == "auto":
        cfg.data.modality = mcfg.modality
    if cfg.data.modality != mcfg.modality:
        raise ConfigError(f"data.modality is {cfg.data.modality}, but the model ({model_source(cfg)}) is an "
                          f"{mcfg.modality} model")


def model_source(cfg: TrainJobConfig) -> str:
    return f"model.init_from {cfg.model.init_from}" if cfg.model.init_from else f"preset {cfg.model.preset}"


def resolve_task(cfg: TrainJobConfig, mcfg: NextDiTConfig, catalog: ShardCatalog) -> NextDiTConfig:
    """Set ``train.task`` when it is "auto" and return the model's architecture with the conditioning the data gives
    it (``data_conditioning``); check that the model, the data and the task agree: an audio preset trains on the
    manifest's audio rows with the t2a task, a class-conditional one on as many classes as the data's labels."""
    from jobs.training.tasks import TASKS, task_for

    if cfg.train.task == "auto":
        mcfg = data_conditioning(cfg, mcfg, catalog)
        cfg.train.task = task_for(mcfg.modality, mcfg.conditioning)
    task = TASKS[cfg.train.task]
    fixed = cfg.model.init_from or "conditioning" in cfg.model.overrides
    if task.conditioned_on == "class" and mcfg.conditioning != "class" and not fixed:  # --set train.task=class-points
        mcfg = mcfg.replace(conditioning="class")
    if mcfg.conditioning == "class":
        mcfg = data_classes(cfg, mcfg, catalog)
    names = cfg.model.class_names
    if names is not None and mcfg.conditioning != "class":
        raise ConfigError("model.class_names is for the class-conditional task (train.task=class)")
    if names is not None and len(names) != mcfg.num_classes:
        raise ConfigError(f"model.class_names has {len(names)} names; the model has {mcfg.num_classes} classes")
    if (task.modality, task.conditioned_on) != (mcfg.modality, mcfg.conditioning):
        raise ConfigError(f"train.task {cfg.train.task} trains {task.conditioned_on}-conditioned {task.modality} "
                          f"models, but the model ({model_source(cfg)}) is a {mcfg.conditioning}-conditioned "
                          f"{mcfg.modality} model")
    return mcfg


def data_conditioning(cfg: TrainJobConfig, mcfg: NextDiTConfig, catalog: ShardCatalog) -> NextDiTConfig:
    """A preset's conditioning follows the data (docs/training.md#tasks-and-modalities): text when there is a text
    encoder or the shards carry text features, else labels when the output has them (``labels.json``, prepared with
    ``read.label_from``) and the registry has a class task for the modality. A pretrained model, or a conditioning
    set in ``model.overrides``, keeps its own."""
    from jobs.training.tasks import TASKS

    if cfg.model.init_from or "conditioning" in cfg.model.overrides or mcfg.conditioning != "text":
        return mcfg
    text = bool(cfg.data.text_encoder) or (cfg.data.text_features != "online"
                                           and catalog.text_feature_width() is not None)
    labelled = catalog.class_names is not None
    class_task = any((t.modality, t.conditioned_on) == (mcfg.modality, "class") for t in TASKS.values())
    if text or not labelled or not class_task:
        return mcfg
    log.info("the %s shards carry labels (%d classes) and no text features: training the label-conditioned task",
             mcfg.modality, len(catalog.class_names))
    return mcfg.replace(conditioning="class", num_classes=len(catalog.class_names))


def data_classes(cfg: TrainJobConfig, mcfg: NextDiTConfig, catalog: ShardCatalog) -> NextDiTConfig:
    """A class-conditional model on labelled data: as many classes as the data's vocabulary (a preset's count is
    replaced; a pretrained model's or an override's must agree), whose names go into the export unless
    ``model.class_names`` gives others."""
    names = catalog.class_names
    if names is None:  # labels the user put in the samples' json (data.label_key) without labels.json
        return mcfg
    if len(names) != mcfg.num_classes:
        if cfg.model.init_from or "num_classes" in cfg.model.overrides:
            raise ConfigError(f"the data has {len(names)} classes ({catalog.root}/{C.LABELS_FILE}), but the model "
                              f"({model_source(cfg)}) has num_classes {mcfg.num_classes}")
        mcfg = mcfg.replace(num_classes=len(names))
    if cfg.model.class_names is None:
        cfg.model.class_names = list(names)
    return mcfg


def resolve_model(cfg: TrainJobConfig, catalog: ShardCatalog, mcfg: NextDiTConfig) -> NextDiTConfig:
    """The architecture of the run, once: ``mcfg`` (``base_model``'s: init_from's, or the preset with its overrides)
    whose caption width comes from the captions (the text encoder's width, or the shards' text features) — as the
    official code takes cap_feat_dim from its text encoder, so one preset trains with Gemma-2B (2048) or a 4096-wide
    LLM alike. It also records what the model is trained on (the buckets that are drawn, plus a pretrained model's own
    record), which the export keeps for RoPE scaling at sampling (docs/sampling.md)."""
    if mcfg.conditioning == "text":
        width, source = caption_width(cfg, catalog)
        if width != mcfg.cap_feat_dim:
            if cfg.model.init_from:
                raise ConfigError(f"model.init_from {cfg.model.init_from} takes {mcfg.cap_feat_dim}-wide caption "
                                  f"features, but {source} gives {width}: fine-tune with the text encoder it was "
                                  "trained with")
            if "cap_feat_dim" in cfg.model.overrides:
                raise ConfigError(f"model.overrides.cap_feat_dim = {mcfg.cap_feat_dim}, but {source} gives {width}")
            log.info("cap_feat_dim %d from %s (preset %s has %d)", width, source, cfg.model.preset, mcfg.cap_feat_dim)
            mcfg = mcfg.replace(cap_feat_dim=width)
    grids = [catalog.buckets[name].grid(mcfg.patch_size) for name in catalog.drawable(cfg.scaling.workers,
                                                                                 cfg.train.grad_accum)]
    return mcfg.trained_on(grids, *([mcfg] if cfg.model.init_from else []))


def caption_width(cfg: TrainJobConfig, catalog: ShardCatalog) -> tuple[int, str]:
    """(width of the caption features the model will see, where it comes from); the shards' precomputed features and
    a given text encoder must agree."""
    from models.text_encoder import hidden_size_of

    encoder = cfg.data.text_encoder
    encoder_width = None
    if encoder:
        try:
            encoder_width = hidden_size_of(encoder)
        except (FileNotFoundError, ValueError) as exc:  # no config there, or a stack of unequal widths
            raise ConfigError(f"data.text_encoder: {exc}") from exc
    feature_width = catalog.text_feature_width() if cfg.data.text_features != "online" else None
    if feature_width is None:
        if encoder_width is None:
            raise ConfigError("the shards carry no precomputed text features (text.npy): pass --text-encoder (or train "
                              "on labels: prepare with --set read.label_from=folder or column)")
        if cfg.data.text_features == "shards":
            raise ConfigError("data.text_features=shards but the shards carry no text.npy")
        return encoder_width, f"the text encoder {encoder}"
    recorded = catalog.encoders.get("text_encoder") or {}
    made_by = f" (encoded by {recorded['path']})" if recorded.get("path") else ""
    if encoder_width is not None and encoder_width != feature_width:
        raise ConfigError(f"the shards' text features are {feature_width} wide{made_by}, but --text-encoder {encoder} "
                          f"gives {encoder_width}: pass the text encoder that prepared the shards")
    if not encoder and catalog.null_text_features() is None:
        log.warning("%s has text features but no %s (an older jobs.prepare) and no --text-encoder was given: "
                    "caption dropout substitutes one zero token for the empty prompt, which the sampler's \"\" "
                    "will not match; pass --text-encoder to encode it", cfg.data.uri, C.NULL_TEXT_FILE)
    return feature_width, f"the shards' text features{made_by}"


def check_encoders(cfg: TrainJobConfig, catalog: ShardCatalog) -> None:
    """The encoders named in the config against those jobs.prepare recorded for the shards. A ``model.vae`` whose
    scale, shift or latent channels differ from the VAE that made the latents is an error (the export would decode
    with it: silently wrong images); another location of the same settings, or of a text encoder whose width agrees,
    is a warning (the export records the given one)."""
    vae = catalog.encoders.get("vae")  # the VAE of the shards' latents: the image VAE, or the mel VAE of audio
    if vae and cfg.model.vae and cfg.model.vae != vae["path"]:
        from pipelines.config import EncodeConfig
        from pipelines.encode import audio_vae_record, vae_record

        audio = cfg.data.modality == C.AUDIO
        # its config.json alone
        given = audio_vae_record(EncodeConfig(audio_vae=cfg.model.vae)) if audio else vae_record(
            EncodeConfig(vae=cfg.model.vae))
        keys = ("scaling_factor", "shift_factor", "latent_channels") + (
            ("latent_rows", "downsample", "mel") if audio else ())
        differ = {k: (given[k], vae[k]) for k in keys if given[k] != vae[k]}
        if differ:
            raise ConfigError(f"model.vae {cfg.model.vae} is not the VAE that encoded the shards ({vae['path']}): "
                              + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))
        log.warning("model.vae %s is not where the shards' latents were encoded (%s); scale, shift and channels "
                    "agree, make sure it is the same autoencoder", cfg.model.vae, vae["path"])
    text = catalog.encoders.get("text_encoder")
    for given in (cfg.model.text_encoder, cfg.data.text_encoder):
        if text and given and given != text["path"]:
            log.warning("text encoder %s is not where the shards' features were encoded (%s); the widths agree, make "
                        "sure it is the same model", given, text["path"])


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a pyarrow S3 filesystem with the endpoint and region of the
    AWS variables (so a custom endpoint such as a local S3 server works), or the absolute local path. Credentials are
    left to the AWS default chain of each node that uses it: explicit keys would be pickled into the run's config."""
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
    return uri.split("://", 1)[1], pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


# Worker errors a restart would raise again: a config or checkpoint that does not fit (ConfigError and CheckpointError
# are ValueErrors), a tensor of the wrong shape, a missing field. The failure budget (run.max_failures) is for lost
# workers and flaky infrastructure (RuntimeError, OSError, actor deaths), which are still retried.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, NotImplementedError)


class DeterministicWorkerError(RuntimeError):
    """A worker failed in a way every restart would repeat: the run stops at once."""


def stop_on_deterministic_errors():
    """A Ray Train callback (on the controller) that ends the run at the first deterministic worker error instead of
    restarting the worker group ``run.max_failures`` times into the same error."""
    from ray.train import UserCallback

    class StopOnDeterministicErrors(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, error in sorted(worker_exceptions.items()):
                cause = getattr(error, "_base_exc", error)  # Ray Train wraps the worker's exception with its traceback
                if isinstance(cause, DETERMINISTIC_ERRORS):
                    # An exception raised here fails the controller's step, which Ray Train does not retry.
                    raise DeterministicWorkerError(
                        f"worker {rank} failed with {type(cause).__name__}: {cause}; a restart would fail the same "
                        f"way, so the run stops without spending run.max_failures\n{error}")

    return StopOnDeterministicErrors()


def build_trainer(cfg: TrainJobConfig):
    """The TorchTrainer for ``cfg`` (no work starts until ``fit()``)."""
    import ray.train  # its ScalingConfig / RunConfig are Ray's; cfg.scaling / cfg.run are our sections of the same name
    from ray.train.torch import TorchTrainer

    from jobs.training.loop import train_loop_per_worker
    from jobs.training.metrics import wandb_mode

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker, **s.custom_resources}
    if s.gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.gpu, resources_per_worker=resources,
                                      accelerator_type=s.accelerator_type if s.gpu else None)
    storage_path, storage_fs = ray_storage(cfg.run.storage)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["WANDB_MODE"] = wandb_mode(cfg.logging.wandb)[0]  # rank 0 logs in the mode the driver (and --dry-run) resolved
    run = ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        worker_runtime_env={"env_vars": env}, callbacks=[stop_on_deterministic_errors()],
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config={"config": to_dict(cfg)}, scaling_config=scaling,
                        run_config=run)


def describe(cfg: TrainJobConfig, catalog: ShardCatalog) -> str:
    """The --dry-run report: model size (built on the meta device), DeepSpeed config, buckets and the data catalog."""
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
             (f"  caption width {mcfg.cap_feat_dim}, " if mcfg.conditioning == "text" else
              f"  {mcfg.num_classes} classes{class_list(cfg.model.class_names)}, ")
             + f"trained on: area {mcfg.rope_area} tokens, sides {list(mcfg.rope_sides)} (RoPE scaling starts beyond)",
             (f"workers: {cfg.scaling.workers} ({'GPU' if cfg.scaling.gpu else 'CPU'}), steps {cfg.train.steps}, "
              f"grad_accum {cfg.train.grad_accum}"),
             f"storage: {join(cfg.run.storage, cfg.run.name)}",
             f"data: {cfg.data.uri}: {len(catalog.shards)} shards, {len(catalog.buckets)} buckets"]
    for name, b in catalog.buckets.items():
        per_step = b.micro_batch * cfg.train.grad_accum * cfg.scaling.workers
        lines.append(f"  bucket {name}: shape {list(b.shape)}, {catalog.bucket_samples(name)} samples, micro-batch "
                     f"{b.micro_batch}, global batch {per_step}, {catalog.bucket_samples(name) // per_step} steps/epoch")
    lines.append("deepspeed: " + json.dumps(deepspeed_config(cfg, cfg.scaling.workers)))
    e = cfg.eval
    if e.every:
        weights = "EMA" if (cfg.ema.enabled if e.use_ema is None else e.use_ema) else "raw"
        conditions = len(e.class_labels) + len(e.prompts)
        lines.append(f"eval: every {e.every} steps and at the last, {conditions} prompt(s) × {len(e.seeds)} seed(s) "
                     f"with the {weights} weights, {e.sampler.steps} {e.sampler.solver} steps, "
                     f"to {join(cfg.run.storage, cfg.run.name, 'eval')}/")
    return "\n".join(lines)


def class_list(names: list[str] | None, shown: int = 8) -> str:
    if not names:
        return ""
    return f" ({', '.join(names[:shown])}{', …' if len(names) > shown else ''})"


def keep_global_batch(cfg: TrainJobConfig, storage_checked: bool = True) -> None:
    """Resuming on another number of workers: set ``train.grad_accum`` so that workers × grad_accum, the micro-batches
    of one optimizer step, is the checkpoint's — the run goes on with the batch it was trained with — and say so; a
    worker count that cannot divide it is a config error. ``train.keep_global_batch: false`` lets the global batch
    follow the workers instead (logged too). Nothing to do on a fresh run or the same count. A ``--dry-run`` does not
    probe the storage (``storage_checked`` false): storage it cannot read is a warning there, not an error."""
    from jobs.training.checkpointing import read_latest_state

    try:
        saved = read_latest_state(join(cfg.run.storage, cfg.run.name))
    except Exception as exc:
        if storage_checked:
            raise
        log.warning("cannot read the run's checkpoints in %s (%s: %s): shown with grad_accum %d as configured",
                    cfg.run.storage, type(exc).__name__, exc, cfg.train.grad_accum)
        return
    if saved is None:
        return
    world, accum = cfg.scaling.workers, cfg.train.grad_accum
    saved_world, saved_accum = int(saved["world"]), int(saved.get("grad_accum", accum))
    per_step = saved_world * saved_accum
    if world * accum == per_step:
        return
    if not cfg.train.keep_global_batch:
        log.warning("resuming the step-%d checkpoint (%d worker(s) × grad_accum %d) on %d × %d: the global batch "
                    "changes from %d to %d micro-batches per step (train.keep_global_batch=false)", saved["step"],
                    saved_world, saved_accum, world, accum, per_step, world * accum)
        return
    if per_step % world:
        raise ConfigError(f"the step-{saved['step']} checkpoint trained {saved_world} worker(s) × grad_accum "
                          f"{saved_accum} = {per_step} micro-batches per step, which {world} workers cannot split "
                          f"evenly: use a worker count that divides {per_step}, or --set train.keep_global_batch=false "
                          "to change the global batch")
    cfg.train.grad_accum = per_step // world
    log.warning("resuming the step-%d checkpoint of %d worker(s) × grad_accum %d on %d worker(s): grad_accum %d keeps "
                "the global batch of %d micro-batches per step (train.keep_global_batch)", saved["step"], saved_world,
                saved_accum, world, cfg.train.grad_accum, per_step)


def train(cfg: TrainJobConfig):
    """Validate, then run (or resume) the training; returns Ray Train's Result."""
    from jobs.runtime import init_ray

    validate(cfg)
    init_ray()
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result
