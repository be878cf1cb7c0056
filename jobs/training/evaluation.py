"""In-training evaluation (issue 19, "In training"; docs/training.md#in-training-evaluation).

Every ``eval.every`` steps and at the last step, the run generates one fixed set — ``eval.prompts`` (a class model:
``eval.class_labels`` and / or class names) × ``eval.seeds`` — with its EMA weights (``eval.use_ema``), through the
modality's own ``models.sampler.Sampler`` and the run's text encoder and VAE, and keeps under ``{run}/eval/``:

    step_{step:08d}/NNNNNN_SEED.png|wav|ply + .json   each sample as jobs.generate writes it (a clip's mel PNG, a
                                                      cloud's .npy and views PNG); an image model without a VAE: .npy
    step_{step:08d}/grid.png                          the step's samples, captioned
    metrics.jsonl                                     one row per evaluation: step, weights, seconds, the numbers
    curve.png                                         the training loss beside each number over the steps

**Weights.** Under ZeRO-3 every rank holds one partition of each parameter, so assembling the weights is a collective
that every rank joins, in step (docs/architecture.md#stack-pitfalls): the EMA through ``ShardedEMA.full_state`` — the
all-gather a checkpoint makes —, and parameters the EMA does not hold (raw weights; a LoRA run's frozen base) through
``deepspeed.zero.GatheredParameters``, module by module as ``parallelize.load_partitioned`` copies them in. Then rank
0 alone samples, on a model of its own built from those weights; the other ranks go on to the next step and wait at
its first collective until rank 0 is back. An error while rank 0 samples, writes or scores is logged and training
goes on: the evaluation observes the run, it does not decide it (the driver checks its config beforehand).

**Numbers** (``{name: float}`` per evaluation):
- built in, needing no weights of their own, against ``eval.reference_samples`` training samples (the largest
  bucket's first ones, read once, as the task gives them to the model): point clouds — ``mmd_cd`` and ``cov_cd`` (models/point_metrics.py, the paper's §5.3 metrics;
  lower / higher is better); images and audio — ``latent_fd``, the Fréchet distance between Gaussians fitted to the
  generated and the training latents' per-token channel vectors (Heusel et al. 2017's formula, with the model's own
  latent channels as the features: it sees colour, brightness and loudness balance, not content; lower is better);
- ``eval.clip_model`` (a transformers CLIP folder for images, CLAP for audio): ``clip_score`` / ``clap_score`` of
  each sample with its prompt, averaged (models/image_features.py, models/audio_metrics.py);
- ``eval.scorers``: "package.module:function" callables, ``fn(samples: list[EvalSample]) -> {name: float}``, e.g.
  the demo's colour fidelity (``jobs.demo_data:colour_fidelity``).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs.training.config import EvalConfig, TrainJobConfig
from models.config_io import ConfigError, to_dict
from models.presets import NextDiTConfig
from models.sampler import GenerationRequest, GenerationResult, Sampler
from models.storage import filesystem, join

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"
GRID_FILE = "grid.png"
# what metrics.jsonl rows hold besides the numbers
ROW_KEYS = ("step", "weights", "samples", "seconds", "dir")


def step_dir_name(step: int) -> str:
    """``step_00000040``: eight digits, as the checkpoints' folders, so both sort by step."""
    return f"step_{step:08d}"


@dataclass
class EvalSample:
    """One generated sample of an evaluation: what a scorer reads."""

    index: int
    prompt: str  # a class model's: the class name (or index) of ``class_label``
    seed: int
    class_label: int | None
    result: GenerationResult  # .image (H×W×3 uint8), .audio + .sample_rate, .points (N, 3); .latent always
    path: str  # the stored sample, relative to the run's eval/ folder


Scorer = Callable[[list[EvalSample]], dict[str, float]]


# ---------------------------------------------------------------------------------------------------------------------
# Driver side: what the run's evaluation will use, checked before any worker starts.
def run_references(cfg: TrainJobConfig, encoders: dict, mcfg: NextDiTConfig) -> dict:
    """The text encoder, VAE and class names the run's samples are generated with: what ``jobs.export`` writes into
    the model folder (``model.*``, then ``data.*``, then the encoders jobs.prepare recorded for the shards), so the
    evaluation samples exactly as the exported model will."""
    from jobs.export import references

    return references(to_dict(cfg), {"encoders": encoders}, text=mcfg.conditioning == "text")


def check_eval(cfg: TrainJobConfig, encoders: dict, mcfg: NextDiTConfig) -> None:
    """What ``TrainJobConfig.validate_eval`` cannot check alone, against the resolved model and the data: prompts (or
    class labels) the model can read, a text encoder to read them, a VAE for audio, sizes of the model's modality,
    scorers that import. Reads ``eval.prompt_file`` into ``eval.prompts`` (the workers need not reach the file)."""
    e = cfg.eval
    if not e.every:
        return
    if e.prompt_file:
        from jobs.generate import read_prompt_file

        try:
            rows = read_prompt_file(e.prompt_file)
            prompts = [str(row["prompt"]) for row in rows]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"eval.prompt_file {e.prompt_file}: {type(exc).__name__}: {exc}") from exc
        e.prompts, e.prompt_file = [*e.prompts, *prompts], None
    meta = run_references(cfg, encoders, mcfg)
    if mcfg.conditioning == "text":
        if e.class_labels:
            raise ConfigError("eval.class_labels is for class-conditional models; this text-conditioned one reads "
                              "eval.prompts")
        if not e.prompts:
            raise ConfigError("eval.every is set, but eval.prompts (or eval.prompt_file) is empty: a text-conditioned "
                              "model needs prompts to generate")
        if "text_encoder" not in meta:
            raise ConfigError("the in-training evaluation reads its prompts with a text encoder, but the run names "
                              "none (model.text_encoder, data.text_encoder) and jobs.prepare recorded none")
    else:
        if not e.prompts and not e.class_labels:
            raise ConfigError("eval.every is set: give a class-conditional model eval.class_labels (class indices) "
                              "or eval.prompts (class names)")
        classes = mcfg.num_classes
        if any(label >= classes for label in e.class_labels):
            raise ConfigError(f"eval.class_labels {e.class_labels}: the model has {classes} classes (0..{classes - 1})")
        names = {n.strip().casefold() for n in cfg.model.class_names or []}
        for prompt in e.prompts:
            text = prompt.strip()
            if not (re.fullmatch(r"[0-9]+", text) and int(text) < classes) and text.casefold() not in names:
                raise ConfigError(f"eval.prompts: {prompt!r} is neither a class index below {classes} nor one of "
                                  "the model's class names (model.class_names)")
    check_sampler_sizes(e, mcfg)
    if mcfg.modality == "audio" and "vae" not in meta:
        raise ConfigError("the in-training evaluation of an audio model decodes with the mel VAE, but the run names "
                          "none (model.vae) and jobs.prepare recorded none")
    if mcfg.modality == "image" and "vae" not in meta:
        log.warning("no VAE is named (model.vae, data.vae) or recorded for the shards: the in-training evaluation "
                    "stores latents (.npy) and a preview of their first channels, not images")
    if e.clip_model and mcfg.modality == "points":
        raise ConfigError("eval.clip_model scores images (CLIP) or audio (CLAP); a point-cloud model gets MMD-CD")
    for name in e.scorers:
        load_scorer(name)


def check_sampler_sizes(e: EvalConfig, mcfg: NextDiTConfig) -> None:
    """``eval.sampler``'s size fields must be those of the model's modality (and valid sizes)."""
    from models.geometry import check_size
    from models.points import check_points

    s = e.sampler
    given = {"width / height": s.width is not None or s.height is not None, "duration": s.duration is not None,
             "points": s.points is not None}
    allowed = {"image": "width / height", "audio": "duration", "points": "points"}[mcfg.modality]
    wrong = [name for name, set_ in given.items() if set_ and name != allowed]
    if wrong:
        raise ConfigError(f"eval.sampler sets {' and '.join(wrong)}, but the model ({mcfg.modality}) takes {allowed}")
    try:
        if s.width is not None or s.height is not None:
            check_size(s.width or s.height, s.height or s.width, s.max_side, mcfg.patch_size, s.max_pixels)
        if s.points is not None:
            check_points(s.points, s.max_points)
    except ValueError as exc:
        raise ConfigError(f"eval.sampler: {exc}") from exc


def load_scorer(name: str) -> Scorer:
    """The callable that ``package.module:function`` names; a ConfigError when it does not import."""
    module, _, function = name.partition(":")
    try:
        scorer = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.scorers: cannot load {name!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(scorer):
        raise ConfigError(f"eval.scorers: {name!r} is not callable")
    return scorer


# ---------------------------------------------------------------------------------------------------------------------
# Worker side.
def gather_weights(module: torch.nn.Module, ema=None) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights of ``module`` on CPU, named as its ``named_parameters``, on rank 0 (None elsewhere): the
    EMA's where ``ema`` (a ``ShardedEMA``) holds them, the module's own otherwise. A collective under ZeRO-3: every
    rank must call it, in step — the EMA's all-gather (what a checkpoint's save runs), then one
    ``GatheredParameters`` per module with parameters outside the EMA, in the same module order on every rank."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = dict(ema.full_state()) if ema is not None else {}  # every rank gets the same names: the same skips below
    for prefix, sub in module.named_modules():
        rest = {f"{prefix}.{name}" if prefix else name: p for name, p in sub.named_parameters(recurse=False)}
        rest = {name: p for name, p in rest.items() if name not in state}
        if not rest:
            continue
        # a no-op for parameters that are not partitioned (ZeRO stages 0–2, or no DeepSpeed at all)
        with deepspeed.zero.GatheredParameters(list(rest.values())), torch.no_grad():
            if rank == 0:
                state.update({name: p.detach().float().cpu().clone() for name, p in rest.items()})
    return state if rank == 0 else None


def build_model(state: dict[str, torch.Tensor], cfg: TrainJobConfig, mcfg: NextDiTConfig,
                device: torch.device, dtype: torch.dtype | None):
    """The model that samples, holding ``state``: a ``NextDiT`` of the run's architecture, or for a LoRA run the base
    with its adapters injected by peft (named as the engine's module, so the gathered names load as they are; the
    sampler runs base + adapters unmerged, as training does)."""
    from models import NextDiT

    if not cfg.lora.enabled:
        return NextDiT.from_state_dict(mcfg, state, device, dtype)
    from jobs.training.lora import apply_lora

    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the training's RNG
        holder = apply_lora(NextDiT(mcfg), cfg.lora)
    holder.load_state_dict(state, strict=True)
    return holder.to(device=device, dtype=dtype).get_base_model()


def eval_requests(e: EvalConfig, class_names: list[str] | None = None) -> list[GenerationRequest]:
    """The fixed set, prompt-major: every class label, then every prompt, each with every seed (one list for every
    evaluation of the run, so a step's samples differ from the last one's only by the weights)."""
    items: list[tuple[str, int | None]] = [
        (class_names[label] if class_names and label < len(class_names) else str(label), label)
        for label in e.class_labels]
    items += [(prompt, None) for prompt in e.prompts]
    return [GenerationRequest(prompt, seed=seed, class_label=label) for prompt, label in items for seed in e.seeds]


def latent_preview(latent: torch.Tensor) -> np.ndarray:
    """An image latent (C, h, w) as an h×w×3 picture of its first three channels, each scaled to its own range: what
    the grid shows for an image model without a VAE."""
    channels = latent.float()[:3]
    channels = torch.cat([channels, channels[-1:].expand(3 - len(channels), -1, -1)]) if len(channels) < 3 else channels
    low = channels.amin(dim=(1, 2), keepdim=True)
    high = channels.amax(dim=(1, 2), keepdim=True)
    scaled = (channels - low) / (high - low).clamp_min(1e-6)
    return (scaled.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def picture(result: GenerationResult) -> np.ndarray:
    """What the grid shows of a sample: the image, a clip's log-mel, a cloud's four views, else the latent preview."""
    from jobs.report import spectrogram_image
    from models.points import render_views

    if result.image is not None:
        return result.image
    if result.mel is not None:
        return spectrogram_image(result.mel)
    if result.points is not None:
        return render_views(result.points, views=4, size=80)
    return latent_preview(result.latent)


def write_samples(eval_dir: str, step: int, requests: list[GenerationRequest],
                  results: list[GenerationResult]) -> list[EvalSample]:
    """Each sample under ``{eval_dir}/step_{step:08d}/`` as jobs.generate writes it (an image model without a VAE: its
    latent as .npy, with the JSON sidecar), and the captioned grid of them all."""
    from jobs.generate import npy_bytes, output_fs, png_bytes, write_result
    from jobs.report import grid_image

    name = step_dir_name(step)
    fs, root = output_fs(join(eval_dir, name))
    samples = []
    for i, (request, result) in enumerate(zip(requests, results)):
        seed = int(result.metadata["seed"])
        if result.image is None and result.audio is None and result.points is None:
            stem = f"{root.rstrip('/')}/{i:06d}_{seed}"
            fs.pipe_file(stem + ".json", json.dumps(result.metadata, indent=2).encode())
            fs.pipe_file(stem + ".npy", npy_bytes(result.latent.numpy()))
            path = stem + ".npy"
        else:
            path = write_result(fs, root, {"index": i}, result)
        samples.append(EvalSample(i, request.prompt, seed, result.metadata.get("class_label"), result,
                                  f"{name}/{path.rsplit('/', 1)[1]}"))
    columns = min(len(samples), 8)
    grid = grid_image([picture(s.result) for s in samples], [f"{s.prompt} (seed {s.seed})" for s in samples],
                      columns=columns, cell=128)
    fs.pipe_file(f"{root.rstrip('/')}/{GRID_FILE}", png_bytes(grid))
    return samples


def reference_latents(task, catalog, count: int) -> list[torch.Tensor]:
    """The first ``count`` samples of the largest bucket (in manifest order: the same every evaluation and every
    attempt) as the task gives them to the model — latents, or clouds as (3, 1, N) — each with its own seeded
    generator where the task draws (an online VAE's posterior sample)."""
    from jobs.training.data import ShardReader

    out: list[torch.Tensor] = []
    if count <= 0:
        return out
    bucket = max(catalog.buckets, key=catalog.bucket_samples)
    reader = ShardReader(catalog, 1)
    try:
        for shard in catalog.buckets[bucket].shards:
            for index in range(catalog.shards[shard].samples):
                sample = reader.sample(shard, index)
                out.append(task.latents(sample, torch.Generator().manual_seed(len(out))).float())
                if len(out) == count:
                    return out
    finally:
        reader.close()
    return out


def latent_fd(generated: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The Fréchet distance (``models.image_metrics.frechet_distance``: Heusel et al. 2017, eq. 6) between Gaussians
    fitted to the per-token channel vectors of two sets of latents (C, …): FID's formula with the model's own latent
    channels as the features."""
    from models.image_metrics import frechet_distance

    def moments(latents: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.concatenate([x.reshape(x.shape[0], -1).T.double().numpy() for x in latents])
        return vectors.mean(0), np.atleast_2d(np.cov(vectors, rowvar=False))

    return frechet_distance(*moments(generated), *moments(reference))


class PromptScore:
    """``eval.clip_model``: the CLIP score of each generated image with its prompt (``models.image_features.
    ClipScorer``) or the CLAP score of each clip (``models.audio_metrics.ClapScorer``), averaged: ``clip_score`` /
    ``clap_score`` (100 · cosine, models/image_metrics.clip_score)."""

    def __init__(self, folder: str, modality: str, device: torch.device):
        if modality == "audio":
            from models.audio_metrics import ClapScorer

            self.name, self.scorer = "clap_score", ClapScorer(folder).to(device)
        else:
            from models.image_features import ClipScorer

            self.name, self.scorer = "clip_score", ClipScorer(folder).to(device)

    def __call__(self, samples: list[EvalSample]) -> dict[str, float]:
        prompts = [s.prompt for s in samples]
        if self.name == "clap_score":
            clips = [s.result.audio for s in samples if s.result.audio is not None]
            if not clips:
                return {}
            scores = self.scorer(clips, samples[0].result.sample_rate, prompts)
        else:
            images = [s.result.image for s in samples if s.result.image is not None]
            if not images:  # an image model without a VAE: nothing to show CLIP
                return {}
            scores = self.scorer(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), prompts)
        return {self.name: float(scores.mean())}


def builtin_metrics(modality: str, generated: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """The numbers every evaluation has (module docstring): none without reference samples."""
    if not reference or not generated:
        return {}
    if modality == "points":
        from models.point_metrics import mmd_cov

        clouds = torch.stack([x[:, 0].T for x in generated])  # (3, 1, N) → (N, 3)
        return mmd_cov(clouds, torch.stack([x[:, 0].T for x in reference]))
    return {"latent_fd": latent_fd(generated, reference)}


def read_rows(eval_dir: str) -> list[dict[str, Any]]:
    """The rows of ``{eval_dir}/metrics.jsonl`` (none before the first evaluation)."""
    fs, path = filesystem(join(eval_dir, METRICS_FILE))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_png(rows: list[dict[str, Any]], losses: list[tuple[float, float]]) -> bytes:
    """The training loss beside each evaluation number over the steps, one panel each, as PNG bytes."""
    from jobs.generate import png_bytes
    from jobs.report import chart_image, panels

    size = (560, 340)
    charts = [chart_image({"loss": losses}, title="training loss", y_label="loss", size=size)]
    names = sorted({k for row in rows for k in row if k not in ROW_KEYS})
    weights = rows[-1]["weights"] if rows else "ema"
    for name in names:
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        charts.append(chart_image({name: points}, title=f"in-training evaluation ({weights} weights): {name}",
                                  y_label=name, size=size, markers=True))
    return png_bytes(panels(charts, columns=2))


class Evaluator:
    """``eval``: the run's in-training evaluation on one worker. Every rank calls it at every step; at the steps that
    are due it gathers the weights (a collective) and rank 0 generates, stores and scores (module docstring).

    Rank 0 keeps the text encoder, VAE and vocoder from the first evaluation on (they do not change) and the
    reference latents; the model copy is built for each evaluation and dropped after it."""

    def __init__(self, cfg: TrainJobConfig, task, catalog, mcfg: NextDiTConfig, run_dir: str, rank: int,
                 device: torch.device, start_step: int = 0, sink=None):
        self.cfg, self.task, self.catalog, self.mcfg = cfg, task, catalog, mcfg
        self.rank, self.device, self.sink = rank, device, sink
        self.eval_dir = join(run_dir, EVAL_DIR)
        self.run_dir = run_dir
        self.use_ema = cfg.ema.enabled if cfg.eval.use_ema is None else cfg.eval.use_ema
        self.dtype = torch.bfloat16 if device.type == "cuda" else None  # as jobs.generate samples on each device
        self.parts: tuple | None = None  # the sampler's text encoder, VAE, config, class names, vocoder
        self.reference: list[torch.Tensor] | None = None
        self.rows: list[dict[str, Any]] = []
        self.scorers: list[Scorer] = []
        if rank == 0:
            # an earlier attempt's rows up to the step this one resumes from; the steps after it are evaluated again
            self.rows = [row for row in read_rows(self.eval_dir) if row["step"] <= start_step]
            self.scorers = [load_scorer(name) for name in cfg.eval.scorers]
        self.prompt_score: PromptScore | None = None  # eval.clip_model's, loaded at the first evaluation

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    def __call__(self, step: int, module: torch.nn.Module, ema=None) -> dict[str, Any] | None:
        """Evaluate at ``step`` if it is due: every rank must call this (the gather is a collective); returns rank 0's
        metrics.jsonl row, else None."""
        if not self.due(step):
            return None
        state = gather_weights(module, ema if self.use_ema else None)
        if self.rank != 0:
            return None
        try:
            return self.evaluate(step, state)
        except Exception:  # the evaluation observes the run: its failure must not end the training
            log.exception("the in-training evaluation at step %d failed; training goes on", step)
            return None

    def sampler(self, state: dict[str, torch.Tensor]) -> Sampler:
        model = build_model(state, self.cfg, self.mcfg, self.device, self.dtype)
        if self.parts is None:
            sampler = Sampler.from_model(model, run_references(self.cfg, self.catalog.encoders, self.mcfg), "",
                                         *self.loaded(), config=self.cfg.eval.sampler,
                                         device=self.device, dtype=self.dtype, vae_required=False)
            self.parts = (sampler.text_encoder, sampler.vae, sampler.config, sampler.class_names, sampler.vocoder)
            return sampler
        return Sampler(model, *self.parts)

    def loaded(self) -> tuple:
        """(text encoder, VAE) the task already holds on this worker, when they are the ones the run samples with:
        loaded once per worker, not twice."""
        meta = run_references(self.cfg, self.catalog.encoders, self.mcfg)
        encoder, vae = getattr(self.task, "encoder", None), getattr(self.task, "vae", None)
        encoder_path, vae_path = (meta.get("text_encoder") or {}).get("path"), (meta.get("vae") or {}).get("path")
        same_encoder = encoder is not None and encoder_path is not None and encoder_path == self.cfg.data.text_encoder
        same_vae = vae is not None and vae_path is not None and vae_path == self.cfg.data.vae
        return (encoder if same_encoder else None), (vae if same_vae else None)

    def evaluate(self, step: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Rank 0's part: generate, store, score, log; returns the metrics.jsonl row."""
        began = time.perf_counter()
        sampler = self.sampler(state)
        requests = eval_requests(self.cfg.eval, sampler.class_names)
        results = sampler.generate(requests)
        del sampler  # the model copy: rebuilt from the next evaluation's weights
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        samples = write_samples(self.eval_dir, step, requests, results)
        if self.reference is None:
            self.reference = reference_latents(self.task, self.catalog, self.cfg.eval.reference_samples)
        metrics = builtin_metrics(self.mcfg.modality, [r.latent for r in results], self.reference)
        if self.cfg.eval.clip_model and self.prompt_score is None:
            self.prompt_score = PromptScore(self.cfg.eval.clip_model, self.mcfg.modality, self.device)
        for scorer in ([self.prompt_score] if self.prompt_score else []) + self.scorers:
            metrics.update({name: float(value) for name, value in scorer(samples).items()})
        row = {"step": step, "weights": "ema" if self.use_ema else "raw", "samples": len(samples),
               "seconds": round(time.perf_counter() - began, 3), "dir": step_dir_name(step), **metrics}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        fs, path = filesystem(join(self.eval_dir, METRICS_FILE))
        with fs.open(path, "w") as f:  # rewritten whole: object stores cannot append
            f.write("".join(json.dumps(r) + "\n" for r in self.rows))
        fs, path = filesystem(join(self.eval_dir, CURVE_FILE))
        fs.pipe_file(path, curve_png(self.rows, self.losses()))
        if self.sink is not None:
            self.sink.log_eval(step, metrics, {"samples": [media(s) for s in samples]})
        log.info("in-training evaluation at step %d: %s (%.1f s)", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "no numbers", row["seconds"])
        return row

    def losses(self) -> list[tuple[float, float]]:
        """(step, loss) of the run so far: the stored metrics files, with this attempt's unflushed rows on top."""
        from jobs.training.metrics import read_history

        rows = {row["step"]: row for row in read_history(self.run_dir)}
        rows.update({row["step"]: row for row in (self.sink.history if self.sink is not None else [])})
        return [(step, rows[step]["loss"]) for step in sorted(rows) if "loss" in rows[step]]


def media(sample: EvalSample) -> tuple[str, Any, str]:
    """A sample as MetricsSink.log_eval's (kind, payload, caption): a clip as audio, anything else as its picture."""
    caption = f"{sample.prompt} (seed {sample.seed})"
    if sample.result.audio is not None:
        return "audio", (sample.result.audio, sample.result.sample_rate), caption
    return "image", picture(sample.result), caption
