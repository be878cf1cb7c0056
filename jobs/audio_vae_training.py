"""Mel-VAE training with Ray Train (library side of ``python -m jobs.train_vae --modality audio``).

The paper's mel VAE (paper §5.2, ``models/audio_vae.py``) trained with the objective of ``models/audio_vae_losses.py``:
L1 reconstruction + KL, and from ``loss.disc_start`` on the multi-window discriminator, two Adam optimizers in one
step (docs/design-decisions.md#mel-vae). Ray Train runs the workers (DDP of the VAE and of the discriminator, gloo on
CPU, NCCL on GPU); every worker holds its share of the data as log-mel spectrograms and draws random crops of
``crop_frames`` frames from it. The data (docs/training.md#training-the-mel-vae) is either

- a folder of audio files (local or s3://, searched recursively; the suffixes of ``pipelines.constants``): decoded
  with soundfile, mixed to mono, resampled to ``model.mel.sample_rate``, turned into log-mels with the VAE's own
  ``MelConfig`` (``models.mel.log_mel``); a file that does not decode is skipped and reported with its reason, or
- a ``jobs.prepare`` output: the ``mel.npy`` members of its audio shards (read with ``pipelines.shards``), which were
  computed with the default ``MelConfig``.

At the end the workers measure the standard deviation of posterior samples of ``scale_batches`` batches of crops each
(the official ``scale_by_std`` measures one batch), rank 0 stores ``scaling_factor = 1/std`` and writes the model
folder (``AudioVAE.save_pretrained``: config.json + model.safetensors, local or s3://) and ``history.json`` in it.

Every ``checkpoint_every`` steps and at the last one the run writes a Ray Train checkpoint under ``storage`` (default:
the output path + ``.checkpoints``): both networks, both optimizers, the losses so far (``state.pt``) and every rank's
crop and noise generators (``rng_rank{r}.pt``). Running the same command again — the same ``storage`` and ``name``,
possibly more ``steps`` — resumes from the latest one (Ray Train V2's resume, as ``jobs.train``), with the same draws an
uninterrupted run makes when the worker count is unchanged; with another count every rank re-seeds its generators from
(seed, rank, step). ``max_failures`` restarts a failed worker group from the latest checkpoint inside one run.
Lives in an importable module (not the ``-m`` entry point) so Ray workers unpickle the config class by reference.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from models.audio_vae import AudioVAEConfig
from models.audio_vae_losses import AudioVAELossConfig
from models.config_io import ConfigError, from_dict, to_dict
from models.mel import MelConfig

log = logging.getLogger("jobs.train_vae")
HISTORY_FILE = "history.json"  # beside config.json and model.safetensors in the output folder
FILES, SHARDS = "files", "shards"  # the two kinds of data


@dataclass
class TrainAudioVAEConfig:
    data: str = ""  # a folder of audio files, or a jobs.prepare output with audio shards
    output: str = ""  # the model folder to write (local or s3://)
    workers: int = 2
    use_gpu: bool = False
    steps: int = 100_000
    batch_size: int = 8  # crops per worker and step
    crop_frames: int = 624  # mel frames per random crop (the official 624); a shorter clip is padded with silence
    lr: float = 1e-4  # both optimizers
    betas: tuple[float, float] = (0.5, 0.9)  # Adam's, as the latent-diffusion autoencoder recipe
    scale_batches: int = 4  # batches of crops per worker whose latents measure scaling_factor = 1/std
    seed: int = 0
    log_every: int = 1  # steps between logged losses (the mean over the workers), kept in history.json
    report_every: int = 100  # steps between ray.train.report calls (and the last step): a collective of seconds
    checkpoint_every: int = 1000  # steps between checkpoints (the last step always writes one)
    storage: str | None = None  # where checkpoints go (local or s3://); None: the output path + ".checkpoints"
    name: str = "train-audio-vae"  # the run under storage: the same storage and name resume
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 0  # worker-group restarts from the latest checkpoint within one run
    model: AudioVAEConfig = field(default_factory=AudioVAEConfig)  # --preset tiny|paper, --set model.channels=…
    loss: AudioVAELossConfig = field(default_factory=AudioVAELossConfig)  # kl_weight, disc_start, discriminator

    def __post_init__(self):
        if not self.data or not self.output:
            raise ConfigError("train_vae needs --data and --output")
        if min(self.workers, self.steps, self.batch_size, self.crop_frames, self.scale_batches, self.log_every,
               self.report_every, self.checkpoint_every, self.num_to_keep) < 1:
            raise ConfigError("workers, steps, batch_size, crop_frames, scale_batches, log_every, report_every, "
                              "checkpoint_every and num_to_keep must be ≥ 1")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be ≥ 0 (or -1: unlimited), got {self.max_failures}")

    @property
    def checkpoints(self) -> str:
        """Where this run's checkpoints go."""
        return self.storage or f"{self.output.rstrip('/')}.checkpoints"
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


# ---- the data --------------------------------------------------------------------------------------------------------
@dataclass
class AudioSources:
    """What the workers read: audio file URIs or shard URLs, found by the driver (so every worker splits one list)."""

    kind: str  # FILES or SHARDS
    items: list[str]
    samples: int  # files, or shard samples

    def describe(self) -> str:
        if self.kind == FILES:
            return f"{self.samples} audio files"
        return f"{len(self.items)} audio shards ({self.samples} clips)"


def find_sources(cfg: TrainAudioVAEConfig) -> AudioSources:
    """The audio under ``cfg.data``: a ``jobs.prepare`` output (it has a manifest) gives its audio shards, any other
    folder its audio files. Raises ConfigError for a missing or empty folder and for a prepare output without audio."""
    from models.storage import filesystem
    from pipelines import constants as C

    data = absolute(cfg.data)  # workers may run elsewhere than the driver's working directory
    fs, root = filesystem(data)
    if not fs.exists(root):
        raise ConfigError(f"--data {cfg.data}: no such folder")
    if fs.exists(f"{root}/{C.MANIFEST_FILE}"):
        return _prepared_shards(cfg, data)
    suffixes = tuple(f".{ext}" for ext in C.AUDIO_EXTENSIONS)
    found = sorted(p for p in (fs.find(root) if fs.isdir(root) else []) if p.lower().endswith(suffixes))
    if not found:
        raise ConfigError(f"no audio files ({', '.join(suffixes)}) under {cfg.data}")
    base = data.rstrip("/")
    items = [f"{base}/{p[len(root):].lstrip('/')}" for p in found]  # the URI as given + the path below it
    return AudioSources(FILES, items, len(items))


def absolute(uri: str) -> str:
    """A local path made absolute; a URL as it is."""
    from models.storage import is_remote

    return uri if is_remote(uri) else os.path.abspath(uri)


def _prepared_shards(cfg: TrainAudioVAEConfig, data: str) -> AudioSources:
    from pipelines import constants as C
    from pipelines.shards import read_manifest, shard_url

    rows = read_manifest(data).to_pylist()
    audio = [r for r in rows if r["modality"] == C.AUDIO and r["member"] == C.MEL_MEMBER]
    if not audio:
        if any(r["modality"] == C.AUDIO for r in rows):
            raise ConfigError(f"the audio shards of {cfg.data} hold latents of a mel VAE, not log-mels "
                              f"({C.MEL_MEMBER}): prepare the audio without encode.audio_vae, or pass the folder of "
                              "audio files")
        held = ", ".join(sorted({str(r["modality"]) for r in rows})) or "no shards"
        raise ConfigError(f"--modality audio: {cfg.data} is a jobs.prepare output without audio shards (its manifest "
                          f"holds {held}); prepare audio files into it, or pass a folder of audio files")
    if cfg.model.mel != MelConfig():  # jobs.prepare computes mel.npy with the default MelConfig (pipelines/encode.py)
        raise ConfigError(f"the audio shards of {cfg.data} hold log-mels of the default MelConfig ({MelConfig()}), "
                          f"not of model.mel ({cfg.model.mel}); train on the audio files to use other mel settings")
    bins = sorted({r["shape"][0] for r in audio})
    if bins != [cfg.model.mel.n_mels]:
        raise ConfigError(f"the audio shards of {cfg.data} hold {bins} mel bins, the VAE reads {cfg.model.mel.n_mels}")
    return AudioSources(SHARDS, [shard_url(data, r["path"]) for r in audio], sum(r["samples"] for r in audio))


def file_mel(url: str, mel: MelConfig):
    """An audio file (local or s3://) → (n_mels, frames) float32 log-mel: soundfile decoding, channels averaged to
    mono, resampled to ``mel.sample_rate``. Raises on anything it cannot use (the caller skips the file)."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    from models.mel import log_mel
    from models.storage import filesystem

    fs, path = filesystem(url)
    data = fs.cat_file(path)
    if not data:
        raise ValueError("zero bytes")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:  # its message names the BytesIO, not the file
        raise ValueError(f"not decodable: libsndfile: {exc.error_string}") from exc
    if not np.isfinite(wave).all():
        raise ValueError("NaN or inf samples")
    mono = torch.from_numpy(wave.mean(axis=1))
    if rate != mel.sample_rate:
        mono = AF.resample(mono, int(rate), mel.sample_rate)
    if mono.shape[0] <= mel.n_fft // 2:  # centred frames reflect-pad half a window
        raise ValueError(f"{mono.shape[0]} samples at {mel.sample_rate} Hz: shorter than half an FFT window "
                         f"({mel.n_fft // 2 + 1})")
    return log_mel(mono, mel)


def load_clips(sources: AudioSources, items: list[str], mel: MelConfig) -> tuple[list, list[dict[str, str]]]:
    """The log-mels of ``items`` (a part of ``sources``) as float32 tensors (n_mels, frames), and what was skipped:
    ``{"source", "reason"}`` for every file (or shard sample) that did not decode or is not a finite log-mel."""
    import torch

    from pipelines.shards import iter_samples

    clips, skipped = [], []

    def skip(source: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("skipping %s: %s", source, reason)
        skipped.append({"source": source, "reason": reason})

    for item in items:
        try:
            if sources.kind == FILES:
                clips.append(file_mel(item, mel))
                continue
            for sample in iter_samples(item):
                tensor = torch.from_numpy(sample["tensor"]).float()
                if tensor.ndim != 2 or tensor.shape[0] != mel.n_mels or not torch.isfinite(tensor).all():
                    skip(f"{item}#{sample['key']}", ValueError(f"not a finite ({mel.n_mels}, frames) log-mel: "
                                                               f"shape {tuple(tensor.shape)}"))
                    continue
                clips.append(tensor)
        except Exception as exc:  # noqa: BLE001 - an unreadable file (or shard) must not stop training
            skip(item, exc)
    return clips, skipped


def random_crops(clips: list, weights, batch: int, frames: int, silence: float, generator):
    """(batch, n_mels, frames) random crops: a clip is drawn with probability ∝ its frames (every frame of the data
    about equally likely), then a random window of it; a clip shorter than ``frames`` is padded with silence."""
    import torch
    import torch.nn.functional as F

    out = []
    for index in torch.multinomial(weights, batch, replacement=True, generator=generator).tolist():
        clip = clips[index]
        length = clip.shape[-1]
        if length <= frames:
            out.append(F.pad(clip, (0, frames - length), value=silence))
            continue
        start = int(torch.randint(length - frames + 1, (1,), generator=generator))
        out.append(clip[:, start:start + frames])
    return torch.stack(out)


# ---- the workers -----------------------------------------------------------------------------------------------------
def _share(items: list[str], rank: int, world: int) -> list[str]:
    """This rank's part of the sources: every world-th, or all of them when there are fewer than workers."""
    return items[rank::world] if len(items) >= world else list(items)


def _gather_data(clips: list, skipped: list, sources: AudioSources, device) -> tuple[list, list[dict], int]:
    """Every rank's counts and skips (a collective); a rank left without clips gets everyone's. Returns (this rank's
    clips, the skips of the whole run, the clips of the whole run)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return clips, skipped, len(clips)
    world = dist.get_world_size()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (len(clips), skipped))
    counts = [n for n, _ in parts]
    every_skip = list({s["source"]: s for _, part in parts for s in part}.values())  # ranks may share sources
    if len(sources.items) < world:  # every rank read every source (_share)
        return clips, every_skip, counts[0]
    if sum(counts) and min(counts) == 0:
        log.warning("a worker decoded no clip of its share (clips per worker %s): every worker trains on all", counts)
        everything: list[Any] = [None] * world
        dist.all_gather_object(everything, [c.cpu() for c in clips])
        clips = [c for part in everything for c in part]
    return clips, every_skip, sum(counts)


def require_clips(clips: list, skipped: list[dict[str, str]], data: str) -> None:
    """ConfigError when nothing decoded (every rank of the run sees the same: after ``_gather_data``)."""
    if not clips:
        first = f" (first: {skipped[0]['source']}: {skipped[0]['reason']})" if skipped else ""
        raise ConfigError(f"no decodable audio in {data}: {len(skipped)} source(s) skipped{first}")


def _mean_over_ranks(logs: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return logs
    keys = sorted(logs)  # every rank logs the same keys at a step
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def latent_std(vae, clips: list, weights, cfg: TrainAudioVAEConfig, device, generator) -> float:
    """Standard deviation of posterior samples (the official ``scale_by_std`` draws them too) of ``scale_batches``
    batches of crops on every worker, pooled over the workers (a collective)."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(3, dtype=torch.float64, device=device)  # Σz, Σz², n
    with torch.no_grad():
        for _ in range(cfg.scale_batches):
            mel = random_crops(clips, weights, cfg.batch_size, cfg.crop_frames, cfg.model.mel.silence, generator)
            mean, logvar = vae.moments(mel.to(device))
            z = vae.sample_posterior(mean, logvar, generator).double()
            count = torch.tensor(float(z.numel()), dtype=torch.float64, device=device)
            total += torch.stack([z.sum(), z.pow(2).sum(), count])
    if dist.is_initialized():
        dist.all_reduce(total)
    s, s2, n = total.tolist()
    return math.sqrt(max(s2 - s * s / n, 0.0) / max(n - 1, 1))


# ---- checkpoints -------------------------------------------------------------------------------------------------------
STATE_FILE = "state.pt"  # rank 0: step, world, both networks and optimizers, the logged losses


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_state(folder: str, step: int, world: int, rank: int, nets: dict, optimizers: dict, history: list,
               generators: dict) -> None:
    """This rank's files of a checkpoint in the local ``folder``: rank 0 the networks, optimizers and losses, every rank
    its generators."""
    import torch

    if rank == 0:
        torch.save({"step": step, "world": world, "history": history,
                    **{k: n.state_dict() for k, n in nets.items()},
                    **{k: o.state_dict() for k, o in optimizers.items()}}, os.path.join(folder, STATE_FILE))
    torch.save({k: g.get_state() for k, g in generators.items()}, os.path.join(folder, _rng_file(rank)))


def load_state(folder: str, seed: int, rank: int, world: int, nets: dict, optimizers: dict,
               generators: dict) -> tuple[int, list]:
    """Restore a checkpoint into the networks, optimizers and this rank's generators; returns (step, history). A
    checkpoint of another architecture is a ConfigError (the user changed the model, not the run)."""
    import torch

    state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    try:
        for key, module in {**nets, **optimizers}.items():
            module.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"the checkpoint of this run (step {state['step']}) does not fit the configured model: "
                          f"{str(exc).splitlines()[0]}; use another --set name=… or storage to start afresh") from exc
    rng = os.path.join(folder, _rng_file(rank))
    if state["world"] == world and os.path.exists(rng):
        for key, value in torch.load(rng, weights_only=True).items():
            generators[key].set_state(value)
    else:  # another worker count: fresh, distinct draws per rank from here on
        for i, generator in enumerate(generators.values()):
            generator.manual_seed(seed + 1000 * rank + 10 * i + 7919 * state["step"])
    return int(state["step"]), list(state["history"])


def train_worker(loop_config: dict) -> None:
    """Ray Train worker loop: load this rank's clips, train, measure the latent scale; rank 0 writes the folder."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from models.audio_vae import AudioVAE
    from models.audio_vae_losses import MultiWindowDiscriminator, discriminator_loss, vae_loss

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = from_dict(TrainAudioVAEConfig, loop_config["config"])
    sources = AudioSources(**loop_config["sources"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    began = time.perf_counter()

    clips, skipped = load_clips(sources, _share(sources.items, rank, world), cfg.model.mel)
    clips, skipped, total_clips = _gather_data(clips, skipped, sources, device)
    require_clips(clips, skipped, cfg.data)
    weights = torch.tensor([float(c.shape[-1]) for c in clips])
    if rank == 0:
        log.info("%d clips (%d skipped) in %.1f s; %s frames on rank 0", total_clips, len(skipped),
                 time.perf_counter() - began, int(weights.sum()))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vae, disc = AudioVAE(cfg.model), MultiWindowDiscriminator(cfg.loss.discriminator)
    vae_model, disc_model = prepare_model(vae), prepare_model(disc)  # DDP when world > 1
    opt_vae = torch.optim.Adam(vae_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_disc = torch.optim.Adam(disc_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    crops = torch.Generator().manual_seed(cfg.seed + 1000 * rank + 1)  # different crops per rank
    noise = torch.Generator().manual_seed(cfg.seed + 1000 * rank + 2)  # posterior samples, discriminator windows
    history: list[dict[str, float]] = []
    vae = vae_model.module if hasattr(vae_model, "module") else vae_model
    nets = {"vae": vae, "disc": disc_model.module if hasattr(disc_model, "module") else disc_model}
    optimizers, generators = {"opt_vae": opt_vae, "opt_disc": opt_disc}, {"crops": crops, "noise": noise}
    done = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            done, history = load_state(folder, cfg.seed, rank, world, nets, optimizers, generators)
        if rank == 0:
            log.info("resuming from the checkpoint of step %d", done)
    started = time.perf_counter()
    for step in range(done + 1, cfg.steps + 1):
        mel = random_crops(clips, weights, cfg.batch_size, cfg.crop_frames, cfg.model.mel.silence, crops).to(device)
        # L_VAE's gradient reaches the discriminator too: zeroed below, so not worth its all-reduce
        with disc_model.no_sync() if hasattr(disc_model, "no_sync") else nullcontext():
            loss, reconstruction, logs = vae_loss(vae_model, disc_model, mel, step, cfg.loss, noise)
            opt_vae.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the VAE's gradients
        opt_vae.step()
        if step >= cfg.loss.disc_start:  # L_D is zero before: skip its passes
            d_loss, d_logs = discriminator_loss(disc_model, mel, reconstruction, step, cfg.loss, noise)
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_disc.step()
            logs.update(d_logs)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, **_mean_over_ranks(logs, device)}
            history.append(record)
            if rank == 0:
                log.info("step %d/%d %s", step, cfg.steps, " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                                     if k != "step"))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as folder:
                save_state(folder, step, world, rank, nets, optimizers, history, generators)
                ray.train.report(history[-1] if history else {"step": step},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder))
        elif history and step % cfg.report_every == 0:
            ray.train.report(history[-1])  # the latest logged losses

    if rank == 0:
        log.info("%d steps in %.1f s", cfg.steps - done, time.perf_counter() - started)
    vae.eval()
    std = latent_std(vae, clips, weights, cfg, device, torch.Generator().manual_seed(cfg.seed + 1000 * rank + 3))
    scale = 1.0 / std
    if rank == 0:
        log.info("latent std %.4f → scaling_factor %.4f", std, scale)
        vae.config = replace(vae.config, scaling_factor=scale, shift_factor=0.0)
        vae.save_pretrained(cfg.output)
        write_history(cfg, {"config": to_dict(cfg), "data": {"kind": sources.kind, "sources": len(sources.items),
                                                             "clips": total_clips, "skipped": skipped},
                            "latent_std": std, "scaling_factor": scale, "workers": world,
                            "seconds": round(time.perf_counter() - began, 2), "steps": history})
    if dist.is_initialized():
        dist.barrier()  # the folder is whole when the run ends


def write_history(cfg: TrainAudioVAEConfig, history: dict) -> None:
    from models.storage import filesystem

    fs, root = filesystem(cfg.output)
    fs.pipe_file(f"{root}/{HISTORY_FILE}", json.dumps(history, indent=1).encode())


def read_history(output: str) -> dict:
    """The ``history.json`` of a model folder written by this job."""
    from models.storage import filesystem

    fs, root = filesystem(output)
    return json.loads(fs.cat_file(f"{root}/{HISTORY_FILE}"))


# ---- the driver ------------------------------------------------------------------------------------------------------
def run(cfg: TrainAudioVAEConfig, sources: AudioSources | None = None) -> dict:
    """Train with Ray Train and write the model folder; returns its history (``read_history``). A run whose workers
    find no decodable audio raises ConfigError."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.runtime import init_ray
    from jobs.training.driver import ray_storage

    sources = sources or find_sources(cfg)
    # rank 0 writes the folder, wherever its working directory is; checkpoints beside it unless storage says
    cfg = replace(cfg, output=absolute(cfg.output), storage=absolute(cfg.checkpoints))
    init_ray()
    resources = {"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}
    storage_path, storage_fs = ray_storage(cfg.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "sources": to_dict(sources)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as exc:
        config_error = worker_config_error(exc)
        if config_error is not None:
            raise config_error from exc
        raise
    return read_history(cfg.output)


def worker_config_error(error) -> ConfigError | None:
    """The ConfigError a worker raised (no decodable audio: the user's to fix, one line) in Ray Train's
    ``WorkerGroupError``, which wraps each worker's exception with its traceback (``_base_exc``)."""
    causes = [getattr(e, "_base_exc", e) for e in error.worker_failures.values()]
    found = next((c for c in causes if isinstance(c, ConfigError)), None)
    return None if found is None else ConfigError(str(found))
