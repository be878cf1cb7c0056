"""``python -m jobs.generate``: prompts → PNGs (image models), WAV / FLAC clips with a mel-spectrogram PNG (audio
models, ``--duration SECONDS [--format flac]``) or point clouds as PLY + NPY with a PNG of rendered views (point-cloud
models, ``--points N``, any density), with a JSON metadata sidecar each.

    python -m jobs.generate --model PATH [--text-encoder PATH] [--vae PATH] [--vocoder PATH] --prompt TEXT … \
        --size WxH --steps N --solver NAME --schedule NAME --guidance G --seed S --out DIR

``--steps`` counts solver steps (grid intervals; NFE = steps × evaluations per step, 2 for midpoint). Text encoder and VAE
default to the references in the model folder's metadata. ``--prompt-file FILE`` (one prompt per line, or JSON lines with
prompt / negative_prompt / structured_prompt / seed / width / height / duration / points) runs as a Ray Data job: an
actor pool of samplers (one GPU each when CUDA is present, half a CPU otherwise) writing to any fsspec URL. Everything
else: ``--config FILE`` / ``--set key=value``. ``--structured-prompt`` is the text of a text-encoder stack's second part (the
audio model's dual encoder); without it, that part reads the prompt.

A class-conditional model (``conditioning: class``) needs no text encoder: each ``--prompt`` is a class index
(``--prompt 3``) or a class name from the folder's ``class_names`` metadata (``--prompt "tabby cat"``), guided against the
null class; ``--negative-prompt`` and ``--text-encoder`` are errors there. The JSON sidecar records ``class_label``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from models.audio import AUDIO_FORMATS, audio_bytes, check_duration
from models.config_io import ConfigError, from_dict, to_dict
from models.geometry import check_size, parse_size
from models.points import check_points, ply_bytes, render_views
from models.sampler import GenerationRequest, SamplerConfig
from models.schedules import make_schedule
from models.solvers import check_solver
from models.text_encoder import TextEncoderConfig
from models.vae import VAEConfig
from models.vocoder import VocoderConfig

log = logging.getLogger("jobs.generate")


@dataclass
class RayConfig:
    actors: int = 1  # sampler replicas in the actor pool
    batch_size: int = 4  # prompts per map_batches call
    num_cpus: float = 0.5  # per actor without CUDA (fractional: whole CPUs starve the read tasks on small machines)
    num_gpus: float = 1.0  # per actor with CUDA


@dataclass
class GenerateConfig:
    model: str = ""  # our model folder, an official checkpoint or a diffusers folder (local or s3://)
    adapter: str | None = None  # a LoRA adapter folder (jobs.export of a LoRA run) merged into the model's weights
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # path None: the folder's metadata
    vae: VAEConfig = field(default_factory=VAEConfig)  # path None: the folder's metadata
    # audio models: a SpeechT5HifiGan folder or "griffin_lim"; path None: the folder's metadata, else the mel VAE's own
    # (an AudioLDM pipeline's vocoder/), else Griffin-Lim (docs/sampling.md#audio)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    negative_prompt: str | None = None  # None: sampler.negative_prompt
    # a text-encoder stack's structured-caption text (the audio model's T5, paper §5.2); None: each prompt itself
    structured_prompt: str | None = None
    size: str | None = None  # "WxH"; None: the sampler's / model's default
    duration: float | None = None  # audio models: seconds per clip; None: the sampler's / model's default
    points: int | None = None  # point-cloud models: points per cloud; None: the sampler's / model's default
    audio_format: str = "wav"  # audio models: wav or flac (each clip also gets a mel-spectrogram PNG)
    seed: int = 0  # image i gets seed + i (a prompt file may give each prompt its own)
    images_per_prompt: int = 1
    out: str = "outputs/generate"
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    ema: bool = False
    ray: RayConfig = field(default_factory=RayConfig)


def build_requests(cfg: GenerateConfig, rows: list[dict] | None = None) -> list[dict]:
    """Rows (index, prompt, negative_prompt, seed, width, height, duration) of every image or clip; validates sizes,
    durations, steps, names (the sampler checks them against the model when it loads)."""
    check_solver(cfg.sampler.solver)
    make_schedule(cfg.sampler.schedule)
    if cfg.audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {cfg.audio_format!r}")
    if sum(x is not None for x in (cfg.size, cfg.duration, cfg.points)) > 1:
        raise ValueError("give one of --size (an image model), --duration (an audio model) or --points (a point-cloud "
                         "model)")
    width, height = parse_size(cfg.size) if cfg.size else (cfg.sampler.width, cfg.sampler.height)
    if rows is None:
        rows = [{"prompt": p} for p in cfg.prompts]
    if not rows:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE")
    out = []
    for row in rows:
        for k in range(cfg.images_per_prompt):
            i = len(out)
            seed = int(row["seed"]) + k if row.get("seed") is not None else cfg.seed + i
            item = {"index": i, "prompt": row["prompt"], "negative_prompt": row.get("negative_prompt",
                                                                                    cfg.negative_prompt),
                    "seed": seed, "width": row.get("width", width), "height": row.get("height", height),
                    "duration": row.get("duration", cfg.duration),
                    "structured_prompt": row.get("structured_prompt", cfg.structured_prompt),
                    "points": row.get("points", cfg.points)}
            if item["duration"] is not None:
                check_duration(item["duration"], cfg.sampler.max_duration)
            if item["points"] is not None:
                check_points(item["points"], cfg.sampler.max_points)
            if item["width"] is not None or item["height"] is not None:
                check_size(item["width"] or item["height"], item["height"] or item["width"], cfg.sampler.max_side,
                           max_pixels=cfg.sampler.max_pixels)
            out.append(item)
    return out


def read_prompt_file(url: str) -> list[dict]:
    from models.storage import filesystem

    fs, path = filesystem(url)
    rows = []
    with fs.open(path, "r") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line) if line.startswith("{") else {"prompt": line})
    return rows


def _torch_setup(cfg: GenerateConfig):
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def build_sampler(cfg: GenerateConfig):
    from models.sampler import Sampler

    device, dtype = _torch_setup(cfg)
    return Sampler.from_pretrained(cfg.model, text_encoder=cfg.text_encoder if cfg.text_encoder.path else None,
                                   vae=cfg.vae if cfg.vae.path else None, config=cfg.sampler, device=device,
                                   dtype=dtype, ema=cfg.ema, adapter=cfg.adapter,
                                   vocoder=cfg.vocoder if cfg.vocoder.path else None)


def output_fs(url: str, storage: dict | None = None):
    """(filesystem, root) of the output URL; a local folder is created (object stores need no folders)."""
    from fsspec.implementations.local import LocalFileSystem

    from models.storage import filesystem

    fs, root = filesystem(url, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    return fs, root


def write_result(fs, root: str, row: dict, result, audio_format: str = "wav") -> str:
    """PNG (an image) or WAV / FLAC plus a mel-spectrogram PNG (a clip), and a JSON sidecar, through fsspec; returns
    the path of the image or clip."""
    from PIL import Image

    stem = f"{root.rstrip('/')}/{row['index']:06d}_{result.metadata['seed']}"
    fs.pipe_file(stem + ".json", json.dumps(result.metadata, indent=2).encode())
    if result.points is not None:  # the cloud as PLY and .npy, and its rendered views
        fs.pipe_file(stem + ".npy", npy_bytes(result.points))
        fs.pipe_file(stem + ".png", png_bytes(Image.fromarray(render_views(result.points))))
        fs.pipe_file(stem + ".ply", ply_bytes(result.points))
        return stem + ".ply"
    if result.audio is not None:
        fs.pipe_file(stem + ".png", png_bytes(mel_picture(result.mel)))
        fs.pipe_file(f"{stem}.{audio_format}", audio_bytes(result.audio, result.sample_rate, audio_format))
        return f"{stem}.{audio_format}"
    fs.pipe_file(stem + ".png", png_bytes(Image.fromarray(result.image)))
    return stem + ".png"


def npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def png_bytes(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def mel_picture(log_mel):
    """A log-mel spectrogram (n_mels, frames) as a grey picture, low frequencies at the bottom, scaled to its range."""
    import numpy as np
    from PIL import Image

    low, high = float(log_mel.min()), float(log_mel.max())
    scaled = (log_mel - low) / max(high - low, 1e-6) * 255
    return Image.fromarray(np.flipud(scaled).astype(np.uint8))


def generate_rows(sampler, rows: list[dict], fs, root: str, progress=None, audio_format: str = "wav") -> list[dict]:
    requests = [GenerationRequest(r["prompt"], r.get("negative_prompt"), r.get("width"), r.get("height"), r["seed"],
                                  duration=r.get("duration"), structured_prompt=r.get("structured_prompt"),
                                  points=r.get("points"))
                for r in rows]
    results = sampler.generate(requests, progress=progress)
    return [{"index": r["index"], "path": write_result(fs, root, r, res, audio_format), "seed": res.metadata["seed"],
             "nfe": res.metadata["nfe"], "seconds": res.metadata["seconds"]} for r, res in zip(rows, results)]


class GenerateActor:
    """Ray Data stage: a sampler loaded once per actor; each batch of prompt rows → PNG + JSON files."""

    def __init__(self, config: dict, storage: dict):
        self.cfg = from_dict(GenerateConfig, config)  # the typed config crosses the Ray boundary as a dict
        self.sampler = build_sampler(self.cfg)
        self.fs, self.root = output_fs(self.cfg.out, storage)

    def __call__(self, batch: dict) -> dict:
        keys = ("index", "prompt", "negative_prompt", "seed", "width", "height", "duration", "structured_prompt",
                "points")
        rows = [{k: _plain(batch[k][i]) for k in keys} for i in range(len(batch["index"]))]
        done = generate_rows(self.sampler, rows, self.fs, self.root, audio_format=self.cfg.audio_format)
        return {k: [d[k] for d in done] for k in ("index", "path", "seed", "nfe", "seconds")}


def _plain(value):
    """numpy scalars / NaN from Arrow → Python values (None for missing sizes)."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return int(value) if isinstance(value, float) and value.is_integer() else value


def run_ray(cfg: GenerateConfig, rows: list[dict]) -> list[dict]:
    import ray
    import torch

    from jobs.runtime import init_ray
    from models.storage import storage_options, without_credentials

    init_ray()
    resources = {"num_gpus": cfg.ray.num_gpus} if torch.cuda.is_available() else {"num_cpus": cfg.ray.num_cpus}
    ds = ray.data.from_items(rows).map_batches(
        GenerateActor, fn_constructor_kwargs={"config": to_dict(cfg),
                                              "storage": without_credentials(storage_options(cfg.out))},
        batch_size=cfg.ray.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.ray.actors), **resources,
    )
    return sorted(ds.take_all(), key=lambda r: r["index"])


def run_local(cfg: GenerateConfig, rows: list[dict]) -> list[dict]:
    from tqdm import tqdm

    sampler = build_sampler(cfg)
    fs, root = output_fs(cfg.out)
    with tqdm(total=len(rows), desc="generate", unit="img") as bar:
        return generate_rows(sampler, rows, fs, root, progress=bar.update, audio_format=cfg.audio_format)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.generate", __doc__.split("\n\n")[0], GenerateConfig,
                         set_example="sampler.schedule.shift=6.0")
    parser.add_argument("--model", help="model folder / official or diffusers checkpoint")
    parser.add_argument("--adapter", help="LoRA adapter folder to apply on top of --model (jobs.export of a LoRA run)")
    parser.add_argument("--text-encoder", help="text-encoder folder or hub id (default: the model's metadata)")
    parser.add_argument("--vae", help="AutoencoderKL folder (default: the model's metadata)")
    parser.add_argument("--vocoder", help="audio models: SpeechT5HifiGan folder, or griffin_lim (default: the model's "
                                          "metadata, else the mel VAE's own, else Griffin-Lim)")
    parser.add_argument("--prompt", action="append",
                        help="a prompt (repeatable); for a class-conditional model a class index or name")
    parser.add_argument("--prompt-file", help="prompt file (lines or JSON lines): runs as a Ray Data job")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--structured-prompt",
                        help="a text-encoder stack's structured-caption text (default: each prompt)")
    parser.add_argument("--size", help="WIDTHxHEIGHT in pixels, multiples of 16")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="audio models: seconds per clip")
    parser.add_argument("--format", choices=AUDIO_FORMATS, help="audio models: wav (default) or flac")
    parser.add_argument("--points", type=int, metavar="N", help="point-cloud models: points per cloud")
    parser.add_argument("--steps", type=int, help="solver steps (grid intervals)")
    parser.add_argument("--solver", help="euler | midpoint | heun | rk4 | dopri5")
    parser.add_argument("--schedule", help="uniform | rational | sigmoid")
    parser.add_argument("--guidance", type=float, help="CFG scale")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="output folder or URL (s3://…)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    flags = {"model": args.model, "adapter": args.adapter, "text_encoder.path": args.text_encoder, "vae.path": args.vae,
             "vocoder.path": args.vocoder,
             "prompts": args.prompt, "prompt_file": args.prompt_file, "negative_prompt": args.negative_prompt,
             "structured_prompt": args.structured_prompt,
             "size": args.size, "duration": args.duration, "points": args.points, "audio_format": args.format, "sampler.steps": args.steps,
             "sampler.solver": args.solver,
             "sampler.schedule.name": args.schedule, "sampler.guidance": args.guidance, "seed": args.seed,
             "out": args.out}
    try:
        cfg = resolve_config(GenerateConfig, args, flags, base=_base_from_metadata(args.model))
        if not cfg.model:
            raise ValueError("no model: give --model PATH")
        rows = build_requests(cfg, read_prompt_file(cfg.prompt_file) if cfg.prompt_file else None)
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc)) from exc
    from jobs.runtime import check_job_path

    check_job_path(cfg.out, "--out")
    if args.dry_run:
        print(json.dumps({"config": to_dict(cfg), "images": len(rows)}, indent=2))
        return 0
    done = run_ray(cfg, rows) if cfg.prompt_file else run_local(cfg, rows)
    log.info("wrote %d outputs to %s", len(done), cfg.out)
    return 0


def _base_from_metadata(model: str | None) -> GenerateConfig | None:
    """Sampler defaults recorded in the model folder (``sampler`` metadata) under every other source."""
    if not model:
        return None
    from models.checkpoint import read_metadata

    sampler = read_metadata(model).get("sampler")
    return GenerateConfig(sampler=from_dict(SamplerConfig, sampler)) if sampler else None


if __name__ == "__main__":
    run_main(main)
