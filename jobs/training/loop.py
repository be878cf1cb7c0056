"""The per-worker training loop (Ray Train V2 ``train_loop_per_worker``).

Per optimizer step (docs/training.md#batches-and-the-loader): the loader gives this worker grad_accum micro-batches
of one bucket; for each, the task (tasks.py) builds (x1, t, noise, conditioning) with per-sample seeded draws,
``models.flow.flow_matching_loss`` gives the batch loss (sum of per-sample losses / micro-batch), DeepSpeed
backpropagates (scaled by 1/grad_accum, gradients averaged over workers), clips at 2.0 and steps AdamW; then the EMA is
updated. So one step's gradient is the mean over the global batch, whatever the number of workers — which is why a
2-worker run follows a 1-process run.

After every step the loop calls its step callbacks with a :class:`StepEnd`; ``train.record_samples`` installs the
:class:`SampleRecorder` (data lineage), and ``run_worker(cfg, callbacks)`` takes more (tests inject faults this way).
With ``eval.every`` set, every ``eval.every`` steps and at the last one, after the step's metrics and checkpoint, the
in-training evaluation (evaluation.py) gathers the EMA weights on every rank and generates its fixed set on rank 0.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from jobs.training import checkpointing
from jobs.training.config import TrainJobConfig
from jobs.training.data import BucketLoader, LoaderState, ShardCatalog
from jobs.training.evaluation import Evaluator
from jobs.training.metrics import MetricsSink, Throughput, peak_flops, train_flops
from jobs.training.parallelize import ShardedEMA, build_model, model_config, parallelize, quiet_deepspeed
from jobs.training.tasks import Task, make_task
from models.config_io import from_dict, to_dict
from models.flow import flow_matching_loss
from models.presets import NextDiTConfig
from models.storage import filesystem, join

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class StepEnd:
    """What a step callback is told after each optimizer step of this worker."""

    step: int
    epoch: int
    bucket: str
    keys: list[str]  # the sample keys this rank consumed in the step, in order
    rank: int
    world: int
    run_dir: str
    logged: bool  # metrics (and a checkpoint, if due) were reported at this step


StepCallback = Callable[[StepEnd], None]


class SampleRecorder:
    """``train.record_samples``: data lineage — the sample keys every rank consumed at every step, as JSON lines under
    ``{run}/samples/{attempt}-rank{r}.jsonl`` (one file per rank and attempt; written at every logged step). It answers
    "which samples made this loss spike" and lets exactly-once resume be checked from outside the code: a step that an
    attempt redid after a restart appears in both attempts' files with the same keys (docs/training.md)."""

    def __init__(self, run_dir: str, rank: int):
        self.path = join(run_dir, "samples", f"{time.time_ns()}-{uuid.uuid4().hex[:6]}-rank{rank}.jsonl")
        self.rows: list[str] = []

    def __call__(self, event: StepEnd) -> None:
        self.rows.append(json.dumps({"step": event.step, "epoch": event.epoch, "bucket": event.bucket,
                                     "keys": event.keys}))
        if event.logged:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            fs, path = filesystem(self.path)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "w") as f:
                f.write("\n".join(self.rows) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train V2 worker entry point; ``loop_config`` = {"config": TrainJobConfig as a dict}."""
    run_worker(from_dict(TrainJobConfig, loop_config["config"]))


def run_worker(cfg: TrainJobConfig, callbacks: Sequence[StepCallback] = ()) -> None:
    """This worker's part of the run: build (or resume), then train to ``train.steps``, calling ``callbacks`` (after
    the SampleRecorder when ``train.record_samples`` is on) at the end of every step."""
    import ray.train
    from ray.train import CheckpointUploadMode

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_deepspeed(cfg.scaling.gpu)
    if cfg.scaling.gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    run_dir = join(cfg.run.storage, cfg.run.name)
    catalog = ShardCatalog.from_config(cfg.data)

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
    loader = BucketLoader(catalog, rank, world, cfg.train.grad_accum, cfg.data.seed, state, cfg.data.open_shards,
                          prefetch=cfg.data.prefetch_steps, until=cfg.train.steps)
    try:
        task = make_task(cfg, catalog, device)
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

        mcfg = model_config(cfg)
        if saved is not None:  # what earlier attempts trained on stays in the record (a resume may change the data)
            mcfg = mcfg.trained_on((), mcfg, from_dict(NextDiTConfig, saved["model"]))
        peak = peak_flops(cfg.logging.peak_tflops) if cfg.scaling.gpu else None
        start_step = loader.state.step
        sink = None
        if rank == 0:
            sink = MetricsSink(run_dir, cfg.train.steps, start_step, to_dict(cfg), cfg.logging.wandb,
                               cfg.logging.wandb_project, cfg.run.name, cfg.logging.progress)
        evaluator = (Evaluator(cfg, task, catalog, mcfg, run_dir, rank, device, start_step, sink)
                     if cfg.eval.every else None)
        attempt = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}"
        recorder = SampleRecorder(run_dir, rank) if cfg.train.record_samples else None
        callbacks = ([recorder] if recorder else []) + list(callbacks)
        meter = Throughput()
        window_loss, window_count = 0.0, 0
        # Only checkpoints are reported to Ray Train; every logged step's metrics go to the sink (metrics.jsonl,
        # wandb, the progress bar). A worker holds one unconsumed report, which the controller takes at its poll
        # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a metrics report per log step held a fast step for up to 2 s
        # (docs/training.md#metrics).
        upload = CheckpointUploadMode.ASYNC if cfg.run.checkpoint_upload == "async" else CheckpointUploadMode.SYNC

        while loader.state.step < cfg.train.steps:
            step_plan, micro_batches = loader.next()
            step, bucket = step_plan.step, step_plan.bucket
            loss_sum, count, caption_tokens = loss_step(engine, task, micro_batches, step_plan.epoch, dtype)
            if ema is not None:
                ema.update()
            tokens = catalog.buckets[bucket].tokens(mcfg.patch_size)
            meter.add(count * world, tokens * count * world, train_flops(mcfg, tokens, caption_tokens) * count * world)
            window_loss, window_count = window_loss + loss_sum, window_count + count

            save_now = step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
            logged = step % cfg.train.log_every == 0 or save_now
            if logged:
                total, n = all_reduce_sum([window_loss, window_count], device)
                metrics = {"step": step, "epoch": step_plan.epoch, "loss": total / n, "bucket": bucket,
                           "grad_norm": float(engine.get_global_grad_norm() or 0.0), "lr": float(engine.get_lr()[0]),
                           "samples_seen": loader.state.samples, **meter.rates(world, peak)}
                window_loss, window_count = 0.0, 0
                meter.reset()
                if sink is not None:
                    sink.log(step, metrics)
                    sink.flush(attempt, checkpoint=save_now)
                if save_now:
                    folder = tempfile.mkdtemp(prefix="ckpt-")  # Ray deletes it once uploaded
                    state = {"step": step, "world": world, "grad_accum": cfg.train.grad_accum,
                             "loader": json.loads(loader.state.to_json()),
                             "model": to_dict(mcfg), "lora": cfg.lora.enabled, "encoders": catalog.encoders,
                             "training": {"proportional_attn": cfg.train.proportional_attn}}
                    checkpointing.save(folder, engine, ema, state, to_dict(cfg))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=checkpointing.checkpoint_dir_name(step),
                                     checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=True)
            if evaluator is not None and evaluator.due(step):  # every rank: the gather is a collective
                began = time.perf_counter()
                evaluator(step, engine.module, ema)  # rank 0 generates while the others wait at the next step
                meter.start += time.perf_counter() - began  # not training time: samples/s and MFU leave it out
            event = StepEnd(step, step_plan.epoch, bucket, [s["key"] for mb in micro_batches for s in mb], rank, world,
                            run_dir, logged)
            for callback in callbacks:
                callback(event)
        if recorder is not None:
            recorder.flush()
        if sink is not None:
            sink.close()
    finally:
        loader.close()
