"""``python -m jobs.demo``: the whole platform end to end on the embedded default (the README's first command).

Local Ray cluster → built-in data set (coloured shapes, tones, primitive solids, a few corrupt files) → ``jobs.prepare``
(all three modalities; images VAE-encoded with the tiny VAE our ``jobs.train_vae`` trained, captions encoded by a tiny
text encoder) → ``jobs.train`` (tiny Next-DiT, DeepSpeed ZeRO-3, 2 Ray Train workers) → ``jobs.export`` → the Serve app
on 127.0.0.1 → images requested over HTTP → a report folder: sample grid, loss curve, every stage's stats, timings, and
the prompt fidelity (the dominant colour of each generated shape against the colour its prompt names).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.demo_data import COLOURS, SHAPES, DemoCounts, build_demo_dataset, dominant_colour
from models.config_io import ConfigError, from_dict, to_dict

log = logging.getLogger("jobs.demo")
REPO_ROOT = Path(__file__).resolve().parent.parent
# trained by jobs.train_vae on the demo shapes (docs/training.md#the-demos-vae)
SHIPPED_VAE = REPO_ROOT / "assets" / "tiny-vae"


@dataclass
class DemoConfig:
    out: str = "out/demo"
    counts: DemoCounts = field(default_factory=DemoCounts)
    vae: str = str(SHIPPED_VAE)
    train_vae: bool = False  # train the VAE with jobs.train_vae first instead of using the shipped one
    vae_steps: int = 1200
    workers: int = 2
    steps: int = 1500
    lr: float = 2e-3  # the tiny model learns in minutes at this rate; the official 1e-4 is for the 2B model
    batch_tokens: int = 512  # per-bucket micro-batch = batch_tokens // image tokens (8 for 128² images)
    seeds_per_prompt: int = 2
    sample_steps: int = 10
    guidance: float = 4.0
    keep: bool = False  # keep an earlier run's output folder (resume) instead of starting clean


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def prepare(cfg: DemoConfig, data: Path, curated: Path, text_encoder: str, vae: str) -> dict:
    from pipelines.config import PrepareConfig
    from pipelines.plan import run_prepare, summary_table

    config = from_dict(PrepareConfig, {
        "inputs": [str(data)], "output": str(curated),
        # 64 patches of 16 px = the tiny preset's training grid (8×8 tokens); buckets are the largest sizes of that
        # budget per width (128×128, 112×144, 144×112, …), so the 128×128 images the demo requests are a trained size
        "bucket": {"image": {"max_patches": 64, "max_aspect": 2.0, "batch_tokens": cfg.batch_tokens},
                   "audio_durations_s": [1.0, 2.0, 4.0], "point_counts": [1024, 2048]},
        # the synthetic shapes repeat by construction (same colour, shape, near-same place): perceptual dedup would
        # drop a fifth of them as near-duplicates; exact dedup stays on
        "filter": {"dedup_perceptual": False},
        "encode": {"vae": vae, "text_encoder": text_encoder},
        "write": {"samples_per_shard": 64},
    }).validate()
    stats = run_prepare(config)
    print(summary_table(stats))
    return stats


def train(cfg: DemoConfig, curated: Path, runs: Path, text_encoder: str, vae: str):
    from jobs.training.config import TrainJobConfig
    from jobs.training.driver import train as run_training

    config = from_dict(TrainJobConfig, {
        "data": {"uri": str(curated), "text_encoder": text_encoder},
        "model": {"preset": "tiny", "text_encoder": text_encoder, "vae": vae},
        "optim": {"lr": cfg.lr},
        "ema": {"decay": 0.99},
        "train": {"steps": cfg.steps, "log_every": 10, "ckpt_every": max(cfg.steps // 2, 1)},
        "scaling": {"workers": cfg.workers},
        "run": {"storage": str(runs), "name": "demo"},
        "logging": {"wandb": "offline"},
    })
    return run_training(config)


def request_images(model_dir: str, prompts: list[tuple[str, str]], cfg: DemoConfig) -> list[dict]:
    """Start the Serve app on loopback, POST every prompt, decode the PNGs."""
    import httpx
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"models": {"demo": {"path": model_dir}}, "api_tokens": ["demo-token"],
              "sampler": {"steps": cfg.sample_steps, "guidance": cfg.guidance},
              "batching": {"max_batch_size": 4}}
    results = []
    try:
        serve.run(build_app(config), name="demo", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300,
                          headers={"Authorization": "Bearer demo-token"}) as client:
            for prompt, colour in prompts:
                response = client.post("/v1/images/generations",
                                       json={"prompt": prompt, "n": cfg.seeds_per_prompt, "size": "128x128", "seed": 0})
                response.raise_for_status()
                for item in response.json()["data"]:
                    from PIL import Image

                    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
                    results.append({"prompt": prompt, "colour": colour, "image": image, "seed": item["seed"],
                                    "nfe": item["nfe"], "latency_s": item["latency_s"]})
    finally:
        serve.shutdown()
    return results


def write_report(report: Path, results: list[dict], history: list[dict], stats: dict, timings: dict) -> dict:
    from jobs.report import image_grid, line_chart

    report.mkdir(parents=True, exist_ok=True)
    predicted = [dominant_colour(r["image"]) for r in results]
    correct = [p == r["colour"] for p, r in zip(predicted, results)]
    fidelity = float(np.mean(correct)) if correct else 0.0
    image_grid([r["image"] for r in results],
               [f"{r['prompt'].removesuffix(' on a white background')} -> {p}" for r, p in zip(results, predicted)],
               report / "samples.png", columns=2 * len(SHAPES))
    losses = [(row["step"], row["loss"]) for row in history if "loss" in row]
    line_chart({"train loss": losses}, report / "loss.png", title="tiny Next-DiT, flow-matching loss (ZeRO-3, 2 workers)")
    summary = {
        "prompt_fidelity": fidelity,
        "chance": 1 / len(COLOURS),
        "images": len(results),
        "per_image": [{"prompt": r["prompt"], "seed": r["seed"], "expected": r["colour"], "dominant": p,
                       "nfe": r["nfe"], "latency_s": r["latency_s"]} for r, p in zip(results, predicted)],
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
        "timings_s": timings,
        "prepare_stats": stats,
    }
    (report / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        "# Demo report", "",
        f"Prompt fidelity (dominant colour of the generated shape = the colour the prompt names): "
        f"**{fidelity:.0%}** of {len(results)} images (chance {1 / len(COLOURS):.0%}).", "",
        f"Training loss: {summary['loss_first']:.4f} → {summary['loss_last']:.4f}" if losses else "No loss logged.", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()], "",
        "Files: `samples.png` (prompt → dominant colour found), `loss.png`, `report.json` (every number, the prepare "
        "stats of every stage), `../curated/stats.json`, `../curated/rejects.parquet`.",
    ]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def run(cfg: DemoConfig) -> dict:
    from jobs.export import export
    from jobs.runtime import init_ray
    from jobs.training.metrics import read_history
    from models.tiny import make_tiny_text_encoder, vocabulary

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
    with timer.stage("build text encoder"):
        captions = [p.read_text() for p in (out / "data").rglob("*.txt")]
        text_encoder = make_tiny_text_encoder(out / "text-encoder", words=vocabulary(captions))
    with timer.stage("prepare (Ray Data)"):
        stats = prepare(cfg, out / "data", out / "curated", text_encoder, vae)
    with timer.stage("train (Ray Train + DeepSpeed ZeRO-3)"):
        train(cfg, out / "curated", out / "runs", text_encoder, vae)
    with timer.stage("export"):
        export(str(out / "runs" / "demo"), str(out / "model"), ema=True)
    with timer.stage("serve and request images over HTTP"):
        results = request_images(str(out / "model"), demo_prompts(), cfg)
    timings = dict(timer.stages, total=round(time.perf_counter() - began, 1))
    history = read_history(str(out / "runs" / "demo"))
    report = write_report(out / "report", results, history, stats, timings)
    report["corrupt_inputs"] = summary["corrupt"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.demo", __doc__, DemoConfig, set_example="counts.images=240")
    parser.add_argument("--out", help="output folder (default out/demo)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--train-vae", action="store_true", default=None, help="train the VAE instead of the shipped one")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = resolve_config(DemoConfig, args, {"out": args.out, "steps": args.steps, "train_vae": args.train_vae})
    if cfg.workers < 1 or cfg.steps < 1:
        raise ConfigError("workers and steps must be ≥ 1")
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    report = run(cfg)
    out = Path(cfg.out).resolve() / "report"
    print(f"\nprompt fidelity: {report['prompt_fidelity']:.0%} of {report['images']} images "
          f"(chance {report['chance']:.0%}); total {report['timings_s']['total']} s")
    print(f"report: {out}/report.md  (samples.png, loss.png, report.json)")
    return 0


if __name__ == "__main__":
    run_main(main)
