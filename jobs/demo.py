"""``python -m jobs.demo``: the whole platform end to end on the embedded default (the README's first command).

Local Ray cluster → built-in data set (coloured shapes, tones of four pitches, primitive solids, a few corrupt
files) → ``jobs.prepare`` (all three modalities; images VAE-encoded with the tiny VAE, tones with the tiny mel VAE, both
trained by our ``jobs.train_vae`` on this data and shipped in ``assets/``; captions encoded by a tiny text encoder) →
``jobs.train`` three times (the tiny Next-DiT on the images, the tiny-audio Next-DiT on the tones, whose captions go
through a tiny CLAP + T5 dual encoder as the paper's, and the tiny-points Next-DiT on 256-point clouds of the solids;
DeepSpeed ZeRO-3, 2 Ray Train workers each) → ``jobs.export`` → one Serve app on 127.0.0.1 holding the three models →
images, 1-s clips and 1024-point clouds requested over HTTP → a report folder: sample grid, mel-spectrogram grid, the
WAVs, rendered views of the clouds, loss curves, every stage's stats, timings, and the prompt fidelity of every model
(the dominant colour of each generated shape against the colour its prompt names; the dominant pitch of each
generated clip against the pitch its prompt names; the built-in solid nearest to each generated cloud, by Chamfer
distance, against the solid its prompt names).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.demo_data import (
    COLOURS,
    PITCHES_HZ,
    SHAPES,
    SOLIDS,
    DemoCounts,
    build_demo_dataset,
    dominant_colour,
    dominant_frequency,
    dominant_pitch,
    nearest_solid,
    reference_solids,
    solid_caption,
    tone_caption,
)
from jobs.runtime import free_port
from models.config_io import ConfigError, from_dict, to_dict

log = logging.getLogger("jobs.demo")
REPO_ROOT = Path(__file__).resolve().parent.parent
# trained by jobs.train_vae on the demo shapes (docs/training.md#the-demos-vae)
SHIPPED_VAE = REPO_ROOT / "assets" / "tiny-vae"
# trained by jobs.train_vae --modality audio on the demo tones (docs/training.md#the-demos-vae): a random mel VAE loses
# the pitch (its decoder does not invert its encoder), this one keeps all four through encode → decode → Griffin-Lim
SHIPPED_MEL_VAE = REPO_ROOT / "assets" / "tiny-mel-vae"
CLIP_SECONDS = 1.0  # the audio bucket and the requested clips: 63 mel frames → 32 latent frames, tiny-audio's grid


@dataclass
class DemoConfig:
    out: str = "out/demo"
    counts: DemoCounts = field(default_factory=DemoCounts)
    vae: str = str(SHIPPED_VAE)
    mel_vae: str = str(SHIPPED_MEL_VAE)
    train_vae: bool = False  # train both VAEs with jobs.train_vae first instead of using the shipped ones
    vae_steps: int = 1200
    mel_vae_steps: int = 1000
    workers: int = 2
    steps: int = 1100
    lr: float = 2e-3  # the tiny model learns in minutes at this rate; the official 1e-4 is for the 2B model
    # per-bucket micro-batch = batch_tokens // image tokens (16 for 128² images: per-step overhead dominates the tiny
    # model, so 16 cost about what 8 do; 1500 steps of 8 had given 100 % fidelity)
    batch_tokens: int = 1024
    seeds_per_prompt: int = 2
    sample_steps: int = 10
    guidance: float = 4.0
    audio: bool = True  # also train, serve and score the tiny-audio model on the tones
    # with the tiny CLAP + T5 dual encoder: 200 steps gave 79 % audio fidelity, 350 gave 100 % (with a tiny Gemma as
    # the audio model's encoder 200 had sufficed; 4 or 10 sampling steps alike)
    audio_steps: int = 350
    audio_lr: float = 2e-3
    audio_micro_batch: int = 8  # clips per worker and step (the manifest's 320-s budget is for real corpora)
    audio_seeds_per_prompt: int = 6
    audio_sample_steps: int = 4
    points: bool = True  # also train, serve and score the tiny-points model on the solids
    # 200 steps at 5e-3 gave 100 % point fidelity (and 150 on half the solids); 300 at 2e-3 gave 67–100 % between runs
    points_steps: int = 200
    points_lr: float = 5e-3
    points_micro_batch: int = 8  # clouds per worker and step
    points_seeds_per_prompt: int = 8
    points_sample_steps: int = 10
    # CFG sharpens the prompt's solid but, above ~2, pulls points off the surface: Chamfer distance to the named
    # solid 0.02 at 1 or 1.5, 0.2 at 4 (the images' and clips' scale)
    points_guidance: float = 1.5
    points_requested: int = 1024  # points per generated cloud: 4× the 256 it trains on (time-aware Fourier features)
    # in-training evaluation (docs/training.md#in-training-evaluation): every eval_every steps of each model (0: off)
    # and at its last, the EMA weights draw one prompt per colour (eval_sample_steps solver steps), per pitch and per
    # solid (the served samples' steps) with seed 0, scored as the served samples are (colour, pitch, nearest solid;
    # MMD-CD and COV-CD for the clouds); the curves and the image model's last grid go into the report. The image
    # model's: about 0.45 s per evaluation on 2 cores (4 VAE decodes are most of it) and 1.7 s for the first (it loads
    # the VAE): 6 evaluations of the 1100 steps add ≈ 4 s
    eval_every: int = 200
    eval_sample_steps: int = 4
    keep: bool = False  # keep an earlier run's output folder (resume) instead of starting clean


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                log.info("── %s", name)
                self.began = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = round(time.perf_counter() - self.began, 2)
                log.info("   %s: %.1f s", name, timer.stages[name])

        return _Stage()


def demo_prompts() -> list[tuple[str, str]]:
    """(prompt, colour) for every colour × shape on a white background."""
    return [(f"a {colour} {shape} on a white background", colour) for colour in COLOURS for shape in SHAPES]


def audio_prompts() -> list[tuple[str, int]]:
    """(prompt, pitch in Hz) for every pitch of the tones, in the captions' words."""
    return [(tone_caption(hertz), hertz) for hertz in PITCHES_HZ]


def eval_prompts() -> list[str]:
    """The in-training evaluation's fixed set: one prompt per colour, the shapes in turn."""
    return [f"a {colour} {SHAPES[i % len(SHAPES)]} on a white background" for i, colour in enumerate(COLOURS)]


def point_prompts() -> list[tuple[str, str]]:
    """(prompt, solid) for every built-in solid, in the captions' words."""
    return [(solid_caption(solid), solid) for solid in SOLIDS]


def prepare(cfg: DemoConfig, data: Path, curated: Path, text_encoder: str, vae: str, mel_vae: str | None) -> dict:
    from pipelines.config import PrepareConfig
    from pipelines.plan import run_prepare, summary_table

    config = from_dict(PrepareConfig, {
        "inputs": [str(data)], "output": str(curated),
        # 64 patches of 16 px = the tiny preset's training grid (8×8 tokens); buckets are the largest sizes of that
        # budget per width (128×128, 112×144, 144×112, …), so the 128×128 images the demo requests are a trained size
        # the tones (1–3 s) are centre-cropped to one 1-s bucket: the tiny-audio model trains on one clip length;
        # the solids go to the default 256-point bucket, the paper's training density
        "bucket": {"image": {"max_patches": 64, "max_aspect": 2.0, "batch_tokens": cfg.batch_tokens},
                   "audio_durations_s": [CLIP_SECONDS]},
        # the synthetic shapes repeat by construction (same colour, shape, near-same place): perceptual dedup would
        # drop a fifth of them as near-duplicates; exact dedup stays on
        "filter": {"dedup_perceptual": False},
        # tones become mel-VAE latents (without a mel VAE they stay log-mels, which the audio model cannot train on)
        "encode": {"vae": vae, "audio_vae": mel_vae, "text_encoder": text_encoder},
        "write": {"samples_per_shard": 64},
    }).validate()
    stats = run_prepare(config)
    print(summary_table(stats))
    return stats


def train(cfg: DemoConfig, curated: Path, runs: Path, text_encoder: str, vae: str):
    """The tiny Next-DiT on the curated images (their precomputed caption features), evaluated while it trains: the
    colour prompts at 128×128, batched in one solve (few steps: it must stay a small part of the training time)."""
    evaluation = {"every": cfg.eval_every, "prompts": eval_prompts(), "seeds": [0],
                  "sampler": {"steps": cfg.eval_sample_steps, "guidance": cfg.guidance, "width": 128, "height": 128,
                              "batch_size": len(COLOURS)},
                  "scorers": ["jobs.demo_data:colour_fidelity"]} if cfg.eval_every else None
    return train_run(cfg, curated, runs, "demo", "tiny", text_encoder, vae, cfg.steps, cfg.lr, evaluation=evaluation)


def train_audio(cfg: DemoConfig, curated: Path, runs: Path, text_encoder: str, mel_vae: str):
    """The tiny-audio Next-DiT on the curated tones (the manifest's audio rows: the task is t2a, from the model),
    its captions encoded online by the dual text encoder ``text_encoder`` (prepare's precomputed features are the
    image model's encoder's), evaluated while it trains: one clip per pitch, scored by its dominant pitch."""
    evaluation = {"every": cfg.eval_every, "prompts": [prompt for prompt, _ in audio_prompts()], "seeds": [0],
                  "sampler": {"steps": cfg.audio_sample_steps, "guidance": cfg.guidance, "duration": CLIP_SECONDS,
                              "batch_size": len(PITCHES_HZ)},
                  "scorers": ["jobs.demo_data:pitch_fidelity"]} if cfg.eval_every else None
    return train_run(cfg, curated, runs, "demo-audio", "tiny-audio", text_encoder, mel_vae, cfg.audio_steps,
                     cfg.audio_lr, {"text_features": "online", "micro_batch": cfg.audio_micro_batch}, evaluation)


def train_points(cfg: DemoConfig, curated: Path, runs: Path, text_encoder: str):
    """The tiny-points Next-DiT on the curated solids (the manifest's points rows: the task is t2p, from the model),
    their captions encoded online by their own tiny text encoder, evaluated while it trains: one cloud per solid at
    the trained 256 points, scored by its nearest solid, with MMD-CD and COV-CD against training clouds."""
    evaluation = {"every": cfg.eval_every, "prompts": [prompt for prompt, _ in point_prompts()], "seeds": [0],
                  "sampler": {"steps": cfg.points_sample_steps, "guidance": cfg.points_guidance,
                              "batch_size": len(SOLIDS)},
                  "scorers": ["jobs.demo_data:solid_fidelity"]} if cfg.eval_every else None
    return train_run(cfg, curated, runs, "demo-points", "tiny-points", text_encoder, None, cfg.points_steps,
                     cfg.points_lr, {"text_features": "online", "micro_batch": cfg.points_micro_batch}, evaluation)


def train_run(cfg: DemoConfig, curated: Path, runs: Path, name: str, preset: str, text_encoder: str, vae: str | None,
              steps: int, lr: float, data: dict | None = None, evaluation: dict | None = None):
    """One jobs.train run of the demo (ZeRO-3 on cfg.workers Ray Train workers, EMA 0.99; wandb offline unless
    WANDB_MODE says otherwise; ``evaluation``: its eval section)."""
    from jobs.training.config import TrainJobConfig
    from jobs.training.driver import train as run_training

    config = from_dict(TrainJobConfig, {
        "data": {"uri": str(curated), "text_encoder": text_encoder, **(data or {})},
        "model": {"preset": preset, "text_encoder": text_encoder, "vae": vae},
        "optim": {"lr": lr},
        "ema": {"decay": 0.99},
        "train": {"steps": steps, "log_every": 10, "ckpt_every": max(steps // 2, 1)},
        "scaling": {"workers": cfg.workers},
        "run": {"storage": str(runs), "name": name},
        **({"eval": evaluation} if evaluation else {}),
    })
    return run_training(config)


def request_samples(models: dict[str, str], prompts: list[tuple[str, str]], clip_prompts: list[tuple[str, int]],
                    cloud_prompts: list[tuple[str, str]], cfg: DemoConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Start one Serve app on loopback holding every model of ``models`` ({"image": folder, "audio": folder,
    "points": folder}), POST every image prompt to /v1/images/generations, every clip prompt to
    /v1/audio/generations and every cloud prompt to /v1/points/generations; decode the PNGs, keep the WAV bytes and
    their samples, read the PLY clouds."""
    import httpx
    import soundfile
    from PIL import Image
    from ray import serve

    from models.points import read_ply
    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"models": {name: {"path": path} for name, path in models.items()}, "default_model": "image",
              "api_tokens": ["demo-token"], "sampler": {"steps": cfg.sample_steps, "guidance": cfg.guidance},
              "limits": {"max_n": max(4, cfg.seeds_per_prompt, cfg.audio_seeds_per_prompt,
                                      cfg.points_seeds_per_prompt)},
              "batching": {"max_batch_size": 4}}
    images, clips, clouds = [], [], []
    try:
        serve.run(build_app(config), name="demo", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300,
                          headers={"Authorization": "Bearer demo-token"}) as client:
            for prompt, colour in prompts:
                response = client.post("/v1/images/generations",
                                       json={"model": "image", "prompt": prompt, "n": cfg.seeds_per_prompt,
                                             "size": "128x128", "seed": 0})
                response.raise_for_status()
                for item in response.json()["data"]:
                    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
                    images.append({"prompt": prompt, "colour": colour, "image": image, "seed": item["seed"],
                                   "nfe": item["nfe"], "latency_s": item["latency_s"]})
            for prompt, hertz in clip_prompts:
                response = client.post("/v1/audio/generations",
                                       json={"model": "audio", "prompt": prompt, "n": cfg.audio_seeds_per_prompt,
                                             "duration": CLIP_SECONDS, "seed": 0, "steps": cfg.audio_sample_steps})
                response.raise_for_status()
                for item in response.json()["data"]:
                    wav = base64.b64decode(item["b64_json"])
                    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
                    clips.append({"prompt": prompt, "hertz": hertz, "wav": wav, "samples": samples, "rate": rate,
                                  "seed": item["seed"], "nfe": item["nfe"], "latency_s": item["latency_s"]})
            for prompt, solid in cloud_prompts:
                response = client.post("/v1/points/generations",
                                       json={"model": "points", "prompt": prompt, "n": cfg.points_seeds_per_prompt,
                                             "points": cfg.points_requested, "seed": 0,
                                             "steps": cfg.points_sample_steps,
                                             "guidance_scale": cfg.points_guidance})
                response.raise_for_status()
                for item in response.json()["data"]:
                    cloud = read_ply(base64.b64decode(item["b64_json"]))
                    clouds.append({"prompt": prompt, "solid": solid, "points": cloud, "seed": item["seed"],
                                   "nfe": item["nfe"], "latency_s": item["latency_s"]})
    finally:
        serve.shutdown()
    return images, clips, clouds


def mel_vae_round_trip(mel_vae: str, seconds: float = CLIP_SECONDS) -> dict:
    """The ceiling of the audio fidelity: how often a clean tone's pitch survives the mel VAE and the vocoder alone
    (log-mel → encode → decode → Griffin-Lim → dominant pitch), one tone per pitch."""
    import torch

    from models.audio_vae import AudioVAE
    from models.mel import griffin_lim, log_mel

    vae = AudioVAE.from_pretrained(mel_vae)
    t = np.arange(round(seconds * vae.mel.sample_rate)) / vae.mel.sample_rate
    found, correct = {}, []
    for hertz in PITCHES_HZ:
        mel = log_mel(torch.from_numpy((0.5 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)), vae.mel)[None]
        decoded = vae.decode(vae.encode(mel, generator=torch.Generator().manual_seed(0)), mel.shape[-1])[0]
        waveform = griffin_lim(decoded, vae.mel).numpy()
        found[str(hertz)] = round(dominant_frequency(waveform, vae.mel.sample_rate), 1)
        correct.append(dominant_pitch(waveform, vae.mel.sample_rate) == hertz)
    return {"fidelity": float(np.mean(correct)), "dominant_hz": found}


def score_clouds(report: Path, clouds: list[dict], history: list[dict]) -> tuple[dict, list[str]]:
    """The points part of the report: each generated cloud's nearest built-in solid (Chamfer distance to a dense
    reference cloud of each) against the solid its prompt names, rendered views of every cloud (``points.png``) and
    the clouds as PLY files; returns (summary fields, report.md lines)."""
    from jobs.report import image_grid
    from models.points import ply_bytes, render_views

    references = reference_solids()
    cloud_dir = report / "points"
    cloud_dir.mkdir(exist_ok=True)
    per_cloud = []
    for i, cloud in enumerate(clouds):
        found, distances = nearest_solid(cloud["points"], references)
        name = f"{i:02d}_{cloud['solid']}_seed{cloud['seed']}.ply"
        (cloud_dir / name).write_bytes(ply_bytes(cloud["points"]))
        per_cloud.append({"prompt": cloud["prompt"], "seed": cloud["seed"], "expected": cloud["solid"],
                          "nearest": found, "chamfer": {k: round(v, 5) for k, v in distances.items()},
                          "points": len(cloud["points"]), "ply": f"points/{name}", "nfe": cloud["nfe"],
                          "latency_s": cloud["latency_s"]})
    image_grid([render_views(c["points"], views=4, size=96) for c in clouds],
               [f"{p['prompt']} -> {p['nearest']}" for p in per_cloud], report / "points.png",
               columns=max(1, len(clouds) // len(SOLIDS)))
    fidelity = float(np.mean([p["nearest"] == p["expected"] for p in per_cloud])) if per_cloud else 0.0
    losses = [row["loss"] for row in history if "loss" in row]
    summary = {"point_fidelity": fidelity, "point_chance": 1 / len(SOLIDS), "clouds": len(clouds),
               "per_cloud": per_cloud, "points_loss_first": losses[0] if losses else None,
               "points_loss_last": losses[-1] if losses else None}
    points = per_cloud[0]["points"] if per_cloud else 0
    lines = [
        f"Point fidelity (the built-in solid nearest to the generated {points}-point cloud by Chamfer distance = the "
        f"solid the prompt names; the model trained on 256 points): **{fidelity:.0%}** of {len(clouds)} clouds "
        f"(chance {1 / len(SOLIDS):.0%}: {len(SOLIDS)} solids, {', '.join(SOLIDS)}).", "",
        f"Points training loss: {losses[0]:.4f} → {losses[-1]:.4f}" if losses else "No points loss logged.", "",
    ]
    return summary, lines


def eval_section(report: Path, eval_dir: Path) -> tuple[dict, list[str]]:
    """The image model's in-training evaluation in the report: its curve (``eval_curve.png``: the training loss
    beside colour fidelity and latent_fd over the steps) and its last grid (``eval_grid.png``), copied from the run's
    ``eval/`` folder; returns (summary fields, report.md lines). Nothing without an evaluation."""
    from jobs.training.evaluation import CURVE_FILE, GRID_FILE, read_rows

    rows = read_rows(str(eval_dir)) if eval_dir.exists() else []
    if not rows:
        return {}, []
    shutil.copyfile(eval_dir / CURVE_FILE, report / "eval_curve.png")
    shutil.copyfile(eval_dir / rows[-1]["dir"] / GRID_FILE, report / "eval_grid.png")
    def cells(name: str, fmt: str) -> str:
        return " | ".join(format(r[name], fmt) if name in r else "–" for r in rows)

    lines = [
        "## In-training evaluation (image model)", "",
        (f"Every {rows[0]['step']} steps the {rows[-1]['weights'].upper()} weights drew {rows[-1]['samples']} fixed "
         "prompts (one per colour, seed 0) while training went on; colour fidelity is the share whose dominant "
         "colour is the colour the prompt names (chance 25%), latent_fd the Fréchet distance of their latents' "
         "channel statistics to the training latents' (lower is closer)."), "",
        "| step | " + cells("step", "d") + " |", "|---|" + "---|" * len(rows),
        "| colour fidelity | " + cells("colour_fidelity", ".0%") + " |",
        "| latent_fd | " + cells("latent_fd", ".3g") + " |", "",
        "![in-training evaluation: loss, colour fidelity, latent_fd](eval_curve.png)", "",
        f"The last evaluation's samples (step {rows[-1]['step']}):", "",
        "![the last in-training evaluation's samples](eval_grid.png)", "",
    ]
    return {"eval": rows}, lines


def other_evals_section(report: Path, eval_dirs: dict[str, Path]) -> tuple[dict, list[str]]:
    """The audio and point models' in-training evaluations in the report: a table of their numbers per evaluation and
    their curves (``eval_curve_{name}.png``); returns (summary fields ``eval_{name}``, report.md lines)."""
    from jobs.training.evaluation import CURVE_FILE, read_rows

    numbers = {"audio": [("pitch fidelity", "pitch_fidelity", ".0%"), ("latent_fd", "latent_fd", ".3g")],
               "points": [("solid fidelity", "solid_fidelity", ".0%"), ("MMD-CD", "mmd_cd", ".3g"),
                          ("COV-CD", "cov_cd", ".0%")]}
    summary, lines = {}, []
    for name, folder in eval_dirs.items():
        rows = read_rows(str(folder)) if folder.exists() else []
        if not rows:
            continue
        shutil.copyfile(folder / CURVE_FILE, report / f"eval_curve_{name}.png")
        summary[f"eval_{name}"] = rows
        lines += [(f"In-training evaluation ({name} model: one sample per prompt, seed 0, "
                   f"{rows[-1]['weights'].upper()} weights, which trail the served raw weights while the EMA "
                   f"(0.99) catches up; curve `eval_curve_{name}.png`):"), "",
                  "| step | " + " | ".join(str(r["step"]) for r in rows) + " |", "|---|" + "---|" * len(rows),
                  *["| " + label + " | " + " | ".join(format(r[key], fmt) if key in r else "–" for r in rows) + " |"
                    for label, key, fmt in numbers[name]], ""]
    return summary, lines


def write_report(report: Path, results: list[dict], history: list[dict], stats: dict, timings: dict,
                 clips: list[dict] | None = None, audio_history: list[dict] | None = None,
                 round_trip: dict | None = None, clouds: list[dict] | None = None,
                 points_history: list[dict] | None = None, eval_dir: Path | None = None,
                 other_eval_dirs: dict[str, Path] | None = None) -> dict:
    from jobs.report import image_grid, line_chart, spectrogram_image

    report.mkdir(parents=True, exist_ok=True)
    predicted = [dominant_colour(r["image"]) for r in results]
    correct = [p == r["colour"] for p, r in zip(predicted, results)]
    fidelity = float(np.mean(correct)) if correct else 0.0
    image_grid([r["image"] for r in results],
               [f"{r['prompt'].removesuffix(' on a white background')} -> {p}" for r, p in zip(results, predicted)],
               report / "samples.png", columns=2 * len(SHAPES))
    losses = [(row["step"], row["loss"]) for row in history if "loss" in row]
    audio_losses = [(row["step"], row["loss"]) for row in audio_history or [] if "loss" in row]
    points_losses = [(row["step"], row["loss"]) for row in points_history or [] if "loss" in row]
    series = {"image (tiny)": losses, **({"audio (tiny-audio)": audio_losses} if audio_losses else {}),
              **({"points (tiny-points)": points_losses} if points_losses else {})}
    line_chart(series, report / "loss.png", title="Next-DiT flow-matching loss (ZeRO-3, 2 workers)")
    summary = {
        "prompt_fidelity": fidelity,
        "chance": 1 / len(COLOURS),
        "images": len(results),
        "per_image": [{"prompt": r["prompt"], "seed": r["seed"], "expected": r["colour"], "dominant": p,
                       "nfe": r["nfe"], "latency_s": r["latency_s"]} for r, p in zip(results, predicted)],
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
    }
    audio_lines: list[str] = []
    if clips is not None:
        import torch

        from models.mel import log_mel

        wav_dir = report / "audio"
        wav_dir.mkdir(exist_ok=True)
        per_clip = []
        for i, clip in enumerate(clips):
            name = f"{i:02d}_{clip['hertz']}hz_seed{clip['seed']}.wav"
            (wav_dir / name).write_bytes(clip["wav"])
            found = dominant_frequency(clip["samples"], clip["rate"])
            per_clip.append({"prompt": clip["prompt"], "seed": clip["seed"], "expected_hz": clip["hertz"],
                             "dominant_hz": round(found, 1), "pitch": dominant_pitch(clip["samples"], clip["rate"]),
                             "wav": f"audio/{name}", "nfe": clip["nfe"], "latency_s": clip["latency_s"]})
        audio_fidelity = float(np.mean([c["pitch"] == c["expected_hz"] for c in per_clip])) if per_clip else 0.0
        mels = [log_mel(torch.from_numpy(np.asarray(c["samples"], dtype=np.float32))).numpy() for c in clips]
        image_grid([spectrogram_image(m) for m in mels],
                   [f"{p['expected_hz']} Hz -> {p['pitch'] or 'none'} (peak {p['dominant_hz']:.0f} Hz)"
                    for p in per_clip],
                   report / "mel.png", columns=max(1, len(clips) // len(PITCHES_HZ)))
        summary.update({
            "audio_fidelity": audio_fidelity,
            "audio_chance": 1 / len(PITCHES_HZ),
            "clips": len(clips),
            "pitches_hz": list(PITCHES_HZ),
            "per_clip": per_clip,
            "audio_loss_first": audio_losses[0][1] if audio_losses else None,
            "audio_loss_last": audio_losses[-1][1] if audio_losses else None,
            "mel_vae_round_trip": round_trip,
        })
        audio_lines = [
            f"Audio fidelity (dominant pitch of the generated {CLIP_SECONDS:g}-s clip, the peak of its magnitude "
            f"spectrum, = the pitch the prompt names): **{audio_fidelity:.0%}** of {len(clips)} clips "
            f"(chance {1 / len(PITCHES_HZ):.0%}: {len(PITCHES_HZ)} pitches, {', '.join(map(str, PITCHES_HZ))} Hz).",
            "",
            *([f"The mel VAE alone (a clean tone → encode → decode → Griffin-Lim) keeps "
               f"{round_trip['fidelity']:.0%} of the pitches: the ceiling of the audio fidelity.", ""]
              if round_trip else []),
            f"Audio training loss: {summary['audio_loss_first']:.4f} → {summary['audio_loss_last']:.4f}"
            if audio_losses else "No audio loss logged.", "",
        ]
    points_lines: list[str] = []
    if clouds is not None:
        points_summary, points_lines = score_clouds(report, clouds, points_history or [])
        summary.update(points_summary)
    eval_summary, eval_lines = eval_section(report, eval_dir) if eval_dir is not None else ({}, [])
    summary.update(eval_summary)
    other_summary, other_lines = other_evals_section(report, other_eval_dirs or {})
    summary.update(other_summary)
    summary.update({"timings_s": timings, "prepare_stats": stats})
    (report / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        "# Demo report", "",
        f"Prompt fidelity (dominant colour of the generated shape = the colour the prompt names): "
        f"**{fidelity:.0%}** of {len(results)} images (chance {1 / len(COLOURS):.0%}).", "",
        f"Training loss: {summary['loss_first']:.4f} → {summary['loss_last']:.4f}" if losses else "No loss logged.", "",
        *audio_lines,
        *points_lines,
        *eval_lines,
        *other_lines,
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()], "",
        "Files: `samples.png` (prompt → dominant colour found), "
        + ("`mel.png` (log-mel of every clip: asked pitch → pitch found), `audio/*.wav`, " if clips is not None else "")
        + ("`points.png` (four views of every cloud: asked solid → nearest solid), `points/*.ply`, "
           if clouds is not None else "")
        + ("`eval_curve.png`, `eval_grid.png` (the in-training evaluation; every step's samples in "
           "`../runs/demo/eval/`), " if eval_lines else "")
        + "".join(f"`eval_curve_{name}.png` (`../runs/demo-{name}/eval/`), " for name in other_eval_dirs or {}
                  if f"eval_{name}" in other_summary)
        + "`loss.png`, `report.json` (every number, the prepare stats of every stage), `../curated/stats.json`, "
        "`../curated/rejects.parquet`.",
    ]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def run(cfg: DemoConfig) -> dict:
    from jobs.export import export
    from jobs.runtime import init_ray
    from jobs.training.metrics import read_history
    from models.tiny import make_tiny_text_encoder, make_tiny_text_encoder_stack, vocabulary

    out = Path(cfg.out).resolve()
    if out.exists() and not cfg.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    began = time.perf_counter()
    with timer.stage("start Ray"):
        init_ray()
    with timer.stage("build data set"):
        summary = build_demo_dataset(out / "data", cfg.counts)
    vae = cfg.vae
    if cfg.train_vae or not Path(vae).exists():
        from jobs.vae_training import TrainVAEConfig
        from jobs.vae_training import run as train_vae

        with timer.stage("train VAE (jobs.train_vae)"):
            vae = str(out / "vae")
            train_vae(TrainVAEConfig(data=str(out / "data" / "images"), output=vae, workers=cfg.workers,
                                     steps=cfg.vae_steps))
    mel_vae = cfg.mel_vae if cfg.audio else None
    if cfg.audio and (cfg.train_vae or not Path(cfg.mel_vae).exists()):
        with timer.stage("train mel VAE (jobs.train_vae --modality audio)"):
            mel_vae = train_mel_vae(cfg, out / "data" / "audio", out / "mel-vae")
    with timer.stage("build text encoders"):
        def captions(modality: str) -> list[str]:
            return [p.read_text() for p in (out / "data" / modality).rglob("*.txt")]

        # images: a tiny Gemma-style decoder (Lumina-Next's kind); audio: the paper's dual encoder, CLAP on the caption
        # and T5 on the structured caption (the caption itself here), as a stack folder
        text_encoder = make_tiny_text_encoder(out / "text-encoder", words=vocabulary(captions("images")))
        audio_text_encoder = make_tiny_text_encoder_stack(out / "audio-text-encoder",
                                                          words=vocabulary(captions("audio")))
        # points: a tiny Gemma-style decoder of their own words, encoded online (the image encoder's vocabulary is
        # the images' captions)
        points_text_encoder = make_tiny_text_encoder(out / "points-text-encoder",
                                                     words=vocabulary(captions("points")))
    with timer.stage("prepare (Ray Data)"):
        stats = prepare(cfg, out / "data", out / "curated", text_encoder, vae, mel_vae)
    with timer.stage("train (Ray Train + DeepSpeed ZeRO-3)"):
        train(cfg, out / "curated", out / "runs", text_encoder, vae)
    models = {"image": str(out / "model")}
    if cfg.audio:
        with timer.stage("train audio (Ray Train + DeepSpeed ZeRO-3)"):
            train_audio(cfg, out / "curated", out / "runs", audio_text_encoder, mel_vae)
        models["audio"] = str(out / "model-audio")
    if cfg.points:
        with timer.stage("train points (Ray Train + DeepSpeed ZeRO-3)"):
            train_points(cfg, out / "curated", out / "runs", points_text_encoder)
        models["points"] = str(out / "model-points")
    with timer.stage("export"):
        export(str(out / "runs" / "demo"), models["image"], ema=True)
        for name in ("audio", "points"):
            if name in models:
                export(str(out / "runs" / f"demo-{name}"), models[name], ema=True)
    served = "images" + (", clips" if cfg.audio else "") + (", clouds" if cfg.points else "")
    with timer.stage(f"serve and request {served} over HTTP"):
        results, clips, clouds = request_samples(models, demo_prompts(), audio_prompts() if cfg.audio else [],
                                                 point_prompts() if cfg.points else [], cfg)
    round_trip = mel_vae_round_trip(mel_vae) if cfg.audio else None
    timings = dict(timer.stages, total=round(time.perf_counter() - began, 1))
    history = read_history(str(out / "runs" / "demo"))
    audio_history = read_history(str(out / "runs" / "demo-audio")) if cfg.audio else None
    points_history = read_history(str(out / "runs" / "demo-points")) if cfg.points else None
    report = write_report(out / "report", results, history, stats, timings, clips if cfg.audio else None,
                          audio_history, round_trip, clouds if cfg.points else None, points_history,
                          out / "runs" / "demo" / "eval",
                          {name: out / "runs" / f"demo-{name}" / "eval" for name in models if name != "image"})
    report["corrupt_inputs"] = summary["corrupt"]
    return report


def train_mel_vae(cfg: DemoConfig, audio: Path, output: Path) -> str:
    """The recipe of assets/tiny-mel-vae: the tiny mel VAE, 32 channels wide, on 64-frame crops of the tones."""
    from jobs.audio_vae_training import TrainAudioVAEConfig
    from jobs.audio_vae_training import run as train_audio_vae

    train_audio_vae(from_dict(TrainAudioVAEConfig, {
        "data": str(audio), "output": str(output), "workers": cfg.workers, "steps": cfg.mel_vae_steps, "lr": 1e-3,
        "batch_size": 8, "crop_frames": 64, "model": {"preset": "tiny", "channels": 32}}))
    return str(output)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.demo", __doc__, DemoConfig, set_example="counts.images=240")
    parser.add_argument("--out", help="output folder (default out/demo)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--train-vae", action="store_true", default=None,
                        help="train the VAE and the mel VAE instead of the shipped ones")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = resolve_config(DemoConfig, args, {"out": args.out, "steps": args.steps, "train_vae": args.train_vae})
    if min(cfg.workers, cfg.steps, cfg.audio_steps, cfg.points_steps) < 1:
        raise ConfigError("workers, steps, audio_steps and points_steps must be ≥ 1")
    if cfg.eval_every < 0 or cfg.eval_sample_steps < 1:
        raise ConfigError("eval_every must be ≥ 0 (0: no in-training evaluation) and eval_sample_steps ≥ 1")
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    report = run(cfg)
    out = Path(cfg.out).resolve() / "report"
    print(f"\nprompt fidelity: {report['prompt_fidelity']:.0%} of {report['images']} images "
          f"(chance {report['chance']:.0%}); total {report['timings_s']['total']} s")
    if "audio_fidelity" in report:
        print(f"audio fidelity: {report['audio_fidelity']:.0%} of {report['clips']} clips "
              f"(chance {report['audio_chance']:.0%})")
    if "point_fidelity" in report:
        print(f"point fidelity: {report['point_fidelity']:.0%} of {report['clouds']} clouds "
              f"(chance {report['point_chance']:.0%})")
    if report.get("eval"):
        print("in-training colour fidelity by step: "
              + ", ".join(f"{r['step']}: {r['colour_fidelity']:.0%}" for r in report["eval"] if "colour_fidelity" in r))
    files = ["samples.png", *(["mel.png", "audio/*.wav"] if "audio_fidelity" in report else []),
             *(["points.png", "points/*.ply"] if "point_fidelity" in report else []),
             *(["eval_curve.png", "eval_grid.png"] if report.get("eval") else []), "loss.png", "report.json"]
    print(f"report: {out}/report.md  ({', '.join(files)})")
    return 0


if __name__ == "__main__":
    run_main(main)
