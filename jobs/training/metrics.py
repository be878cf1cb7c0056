"""Training metrics (issue "Metrics every N steps"): loss, grad norm, lr, samples/s, tokens/s, bucket and, on GPU, model
FLOP utilisation — through the console (a progress bar on rank 0), Prometheus gauges, wandb (offline by default),
``metrics.jsonl``, and with each checkpoint ``ray.train.report``.

MFU counts *model* FLOPs (forward + backward = 3 × forward, matmuls and attention only, the PaLM convention of
docs/benchmarks.md#targets): activation-checkpointing recomputation is not counted, so turning it on lowers MFU, as it
should.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

from jobs.training.config import WANDB_MODES
from models import NextDiTConfig
from models.config_io import ConfigError
from models.storage import filesystem, is_remote, join

log = logging.getLogger(__name__)

# Dense bf16 peaks from the vendors' datasheets, TFLOP/s per device (substring of torch.cuda.get_device_name()).
# A bf16 8192³ matmul measured 753 TFLOP/s on an H100 (docs/benchmarks.md#anchors): pass logging.peak_tflops=753 to
# compare with that.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def forward_flops(cfg: NextDiTConfig, image_tokens: int, caption_tokens: int = 0) -> float:
    """Matmul + attention FLOPs of one sample's forward pass (2 FLOPs per multiply-add)."""
    d, n, L = cfg.dim, image_tokens, caption_tokens
    kv = cfg.kv_heads * cfg.head_dim
    per_block = (
        2 * n * d * (2 * d + 2 * kv)  # wq, wo (d×d) and wk, wv (d×kv)
        + 4 * n * n * d  # self-attention: QKᵀ and AV
        + 3 * 2 * n * d * cfg.ffn_hidden_dim  # SwiGLU w1, w3, w2
        + 2 * cfg.cond_dim * 4 * d  # adaLN modulation (per sample)
    )
    if cfg.conditioning == "text" and L:
        per_block += 2 * L * cfg.cap_feat_dim * 2 * kv + 4 * n * L * d  # caption K/V projections + cross-attention
    patch = cfg.patch_size ** 2
    embed = 2 * n * patch * cfg.in_channels * d + 2 * n * d * patch * cfg.out_channels
    embed += 2 * cfg.cond_dim * d  # the final layer's adaLN scale (per sample)
    return float(cfg.n_layers * per_block + embed)


def train_flops(cfg: NextDiTConfig, image_tokens: int, caption_tokens: int = 0) -> float:
    """Model FLOPs of one sample's training step: forward + backward (2 × forward)."""
    return 3.0 * forward_flops(cfg, image_tokens, caption_tokens)


def peak_flops(configured_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one local accelerator; None on CPU or for an unknown device without a configured value."""
    if configured_tflops:
        return configured_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(model_flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak of all devices (0..1); None without a known peak."""
    if not peak or seconds <= 0:
        return None
    return model_flops / seconds / (peak * devices)


class Throughput:
    """Samples, tokens and model FLOPs accumulated over a logging window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0

    def add(self, samples: int, tokens: int, flops: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    def rates(self, devices: int, peak: float | None) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / seconds, "tokens_per_s": self.tokens / seconds,
               "tflops_per_device": self.flops / seconds / devices / 1e12}
        utilisation = mfu(self.flops, seconds, devices, peak)
        if utilisation is not None:
            out["mfu"] = utilisation
        return out


WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older spellings of WANDB_MODE, which it still reads


def wandb_mode(configured: str | None) -> tuple[str, str]:
    """(the effective wandb mode, where it comes from). A mode written in the config (logging.wandb) is the user's
    choice and wins; unset, the environment decides (WANDB_DISABLED, WANDB_MODE), as for any wandb program; with
    neither, offline (docs/training.md#metrics). wandb.init's own ``mode=`` would override the environment, which is why
    the mode is resolved here and passed on, never the config's default."""
    if configured is not None:
        return configured, "logging.wandb"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return "offline", "the default (neither logging.wandb nor WANDB_MODE is set)"
    mode = WANDB_ALIASES.get(env, env)
    if mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={env!r} is not one of {list(WANDB_MODES)}")
    return mode, "WANDB_MODE"


def wandb_local_dir(run_dir: str, run_name: str) -> str:
    """The folder wandb writes its files under (``{dir}/wandb/offline-run-…``): the run folder when storage is local;
    on remote storage, which wandb cannot write, a local staging folder on the rank-0 node whose offline runs are
    copied into ``{run}/wandb/`` at every checkpoint and at the end (MetricsSink.upload_wandb)."""
    if not is_remote(run_dir):
        return run_dir
    return os.path.join(tempfile.gettempdir(), "lumina-wandb", run_name)


def describe_wandb(configured: str | None, run_dir: str, run_name: str) -> str:
    """The --dry-run line: the effective mode, where it comes from, and where offline runs go."""
    mode, source = wandb_mode(configured)
    line = f"wandb: {mode} (from {source})"
    if mode == "offline":
        local = wandb_local_dir(run_dir, run_name)
        if local == run_dir:
            line += f"; offline runs go to {join(run_dir, 'wandb')}/offline-run-*"
        else:
            line += (f"; offline runs are written under {local}/wandb on the rank-0 worker and copied to "
                     f"{join(run_dir, 'wandb')}/ at every checkpoint and at the end")
        line += " (upload them with `wandb sync`)"
    elif mode == "online":
        line += "; the rank-0 worker needs WANDB_API_KEY in its node's environment"
    return line


# Rank 0's metrics as Prometheus gauges, tagged with the run name: Ray's metrics agent on the node exports each as
# ray_<name>{run=…} (infra/observability/ scrapes and draws them; docs/training.md#metrics).
PROMETHEUS_GAUGES = {
    "step": "lumina_train_step",
    "loss": "lumina_train_loss",
    "grad_norm": "lumina_train_grad_norm",
    "lr": "lumina_train_lr",
    "samples_per_s": "lumina_train_samples_per_s",
    "tokens_per_s": "lumina_train_tokens_per_s",
    "tflops_per_device": "lumina_train_tflops_per_device",
    "mfu": "lumina_train_mfu",
}


def prometheus_gauges(run_name: str) -> dict[str, Any]:
    """The gauges of PROMETHEUS_GAUGES, tagged ``run``; none outside Ray (no metrics agent to export them)."""
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util.metrics import Gauge

    gauges = {}
    for key, name in PROMETHEUS_GAUGES.items():
        gauges[key] = Gauge(name, f"training {key} of rank 0 at its last logged step", tag_keys=("run",))
        gauges[key].set_default_tags({"run": run_name})
    # the in-training evaluation's numbers (evaluation.py): one gauge, tagged with the metric, whose names depend on
    # the modality and the configured scorers
    gauges["eval"] = Gauge("lumina_train_eval", "the in-training evaluation's numbers at its last evaluation",
                           tag_keys=("run", "metric"))
    gauges["eval"].set_default_tags({"run": run_name})
    return gauges


class MetricsSink:
    """Rank 0's outputs: a progress bar, Prometheus gauges, wandb, and ``metrics.jsonl`` in the run directory (every
    logged step)."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, config: dict[str, Any],
                 wandb_configured: str | None, project: str, run_name: str, progress: bool):
        self.run_dir = run_dir
        self.wandb_mode, _ = wandb_mode(wandb_configured)
        self.wandb_dir = wandb_local_dir(run_dir, run_name)
        self.history: list[dict[str, Any]] = []
        self.bar = None
        if progress:
            # Ray's tqdm: from a worker it sends the bar's state to the driver, which draws it; a plain tqdm's carriage
            # returns come through Ray's per-line log prefixes as a garbled line per refresh
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step")
            self.bar.n = start_step
        self.gauges = prometheus_gauges(run_name)
        self.wandb = None
        if self.wandb_mode != "disabled":
            self.wandb = self._init_wandb(config, self.wandb_mode, project, run_name)

    def _init_wandb(self, config, mode, project, run_name):
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a pinned dependency
            log.warning("wandb is not installed; metrics go to metrics.jsonl only")
            return None
        # The id is the run name so that a resumed run continues the same wandb run.
        os.makedirs(self.wandb_dir, exist_ok=True)
        return wandb.init(project=project, name=run_name, id=run_name, resume="allow", mode=mode, dir=self.wandb_dir,
                          config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_description(f"train loss {metrics['loss']:.4f} bucket {metrics.get('bucket')}")
        for key, gauge in self.gauges.items():
            if key in PROMETHEUS_GAUGES and isinstance(value := row.get(key), (int, float)):
                gauge.set(float(value))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_eval(self, step: int, metrics: dict[str, float], media: dict[str, list] | None = None) -> None:
        """An in-training evaluation (evaluation.py): its numbers to Prometheus (``lumina_train_eval{metric=…}``) and,
        with its samples, to wandb under ``eval/`` — after the step's own ``log``, since wandb's steps only go
        forward. ``media``: name → the samples as (kind, payload, caption), kind "image" (an H×W×3 uint8 array) or
        "audio" ((waveform, sample rate)). They stay out of ``history`` (metrics.jsonl is the loss's: one row per
        step); the evaluation writes its own ``{run}/eval/metrics.jsonl``."""
        if "eval" in self.gauges:
            for name, value in metrics.items():
                self.gauges["eval"].set(float(value), tags={"metric": name})
        if self.wandb is None:
            return
        import wandb

        row: dict[str, Any] = {f"eval/{k}": v for k, v in metrics.items()}
        for name, items in (media or {}).items():
            row[f"eval/{name}"] = [wandb.Image(payload, caption=caption) if kind == "image"
                                   else wandb.Audio(payload[0], sample_rate=payload[1], caption=caption)
                                   for kind, payload, caption in items]
        self.wandb.log(row, step=step)

    def flush(self, attempt: str, checkpoint: bool = False) -> None:
        """Write this attempt's history (one file per attempt: object stores cannot append); at a checkpoint, also
        copy the offline wandb run to remote storage."""
        fs, path = filesystem(join(self.run_dir, "metrics", f"{attempt}.jsonl"))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in self.history))
        if checkpoint:
            self.upload_wandb()

    def upload_wandb(self) -> None:
        """Copy the offline wandb runs of the local staging folder into ``{run}/wandb/`` when storage is remote, so
        they outlive the rank-0 pod (``wandb sync`` them from there). A copy made while the run is live may end in a
        partly written record, which the next copy replaces; the copy after ``finish()`` is complete."""
        if self.wandb is None or self.wandb_mode != "offline" or self.wandb_dir == self.run_dir:
            return
        local = os.path.join(self.wandb_dir, "wandb")
        try:
            fs, remote = filesystem(join(self.run_dir, "wandb"))
            for name in sorted(os.listdir(local)):
                folder = os.path.join(local, name)
                # only the run folders: wandb's latest-run and debug*.log are symlinks into them
                if name.startswith("offline-run-") and os.path.isdir(folder) and not os.path.islink(folder):
                    fs.put(folder + "/", f"{remote}/{name}", recursive=True)
        except Exception as exc:  # metrics must not stop the training: the next checkpoint copies again
            log.warning("could not copy the offline wandb run to %s: %s: %s", join(self.run_dir, "wandb"),
                        type(exc).__name__, exc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.upload_wandb()


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """Every logged step of a run, later attempts overriding earlier ones for the same step (what was kept)."""
    fs, path = filesystem(join(run_dir, "metrics"))
    rows: dict[int, dict[str, Any]] = {}
    for file in sorted(fs.glob(path + "/*.jsonl")):
        with fs.open(file, "r") as f:
            for line in f:
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]
