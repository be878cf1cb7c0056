"""``python -m jobs.evaluate``: score generated images or clips against a real set — FID (or FD in any feature space:
FD_DINOv2, FD_CLIP), KID, IS, CLIP score; FAD, KL, CLAP score — into ``OUT/report.json``, ``OUT/report.md`` and a PNG
grid of samples.

    python -m jobs.evaluate --real URI --fake URI --metric fid,kid,is,clip_score \
        --feature-extractor pt_inception-2015-12-05-6726825d.pth --clip-model CLIP_FOLDER --out DIR
    python -m jobs.evaluate --real-stats VIRTUAL_imagenet256_labeled.npz --fake SAMPLES --metric fid \
        --feature-extractor pt_inception-2015-12-05-6726825d.pth --out DIR
    python -m jobs.evaluate --model MODEL --prompts PROMPTS.txt --real URI --metric fid,clip_score … --out DIR
    python -m jobs.evaluate --model MODEL --classes 1000 --samples 50 --real-stats REF.npz --metric fid,is … --out DIR

Score only: ``--real`` and ``--fake`` are folders of PNG / JPEG / WebP (or WAV / FLAC / MP3 / OGG) files, local or
``s3://``, a ``jobs.prepare`` output (its image shards, or its audio shards' original clips), or an ``.npz`` image
batch (ADM's ``arr_0``). ``--real-stats FILE.npz`` instead gives the real side's statistics: a file this job cached, or an
ADM reference batch (``mu`` / ``sigma``, docs/evaluation.md#the-adm-reference-format). The real side's statistics are
computed once per extractor, resolution and file listing and cached as ``.npz`` (``stats_cache``). Generate and score:
``--model`` with ``--prompts FILE`` (jobs.generate's prompt file) or ``--classes N --samples K`` (a class-conditional
model, K per class) first writes the samples into ``OUT/samples`` with jobs.generate's code (a prompt file as a Ray
Data job), skipping those already there, then scores them as ``--fake``.

Extractors and models are local paths (or ``s3://``), never downloaded: ``--feature-extractor`` the FID Inception
weights file or a transformers vision folder (CLIP, DINOv2), ``--clip-model`` a CLIPModel folder, ``--audio-model`` a
ClapModel or audio-encoder folder (FAD), ``--clap-model`` a ClapModel folder, ``--classifier`` an audio classifier
folder (KL). The CLIP and CLAP scores take each sample's prompt from ``--prompts FILE`` (JSON lines with ``file``,
relative to ``--fake``, and ``prompt``) or from the JSON sidecar jobs.generate writes beside it. A file that does not
decode is counted and listed in the report with its reason; the rest are scored. Details: docs/evaluation.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.generate import GenerateConfig
from models.config_io import ConfigError, to_dict

log = logging.getLogger("jobs.evaluate")

IMAGE_METRICS = ("fid", "kid", "is", "clip_score")
AUDIO_METRICS = ("fad", "kl", "clap_score")
REFERENCE_METRICS = ("fid", "kid", "fad", "kl")  # the metrics that compare against the real set
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
SAMPLES_DIR = "samples"  # generate-and-score: OUT/samples
LABELS = {"kid": "KID", "is": "IS", "clip_score": "CLIP score", "kl": "KL", "clap_score": "CLAP score"}


@dataclass
class KIDConfig:
    subsets: int = 100  # random subsets averaged (Bińkowski et al. 2018)
    subset_size: int = 1000  # per subset and side (fewer when a set is smaller)
    seed: int = 0


@dataclass
class EvaluateConfig:
    real: str | None = None  # folder / jobs.prepare output / .npz image batch, local or s3://
    fake: str | None = None  # the generated samples; generate-and-score: OUT/samples
    real_stats: str | None = None  # statistics .npz instead of --real: cached by this job, or an ADM reference batch
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    feature_extractor: str | None = None  # fid / kid / is: the FID Inception weights file or a transformers folder
    clip_model: str | None = None  # clip_score: a transformers CLIPModel folder
    audio_model: str | None = None  # fad: a ClapModel folder or a transformers audio encoder with feature extractor
    clap_model: str | None = None  # clap_score: a ClapModel folder
    classifier: str | None = None  # kl: a transformers audio classifier folder (AST on AudioSet, …)
    kl_mode: str = "auto"  # softmax | sigmoid | auto (sigmoid for a multi-label classifier)
    prompts: str | None = None  # score only: JSON lines {file, prompt}; generate: jobs.generate's prompt file
    resolution: int | None = None  # images: centre-crop and resize to this side first (None: as stored)
    limit: int | None = None  # at most this many samples per side (the first in name order)
    batch_size: int = 32
    device: str = "auto"  # auto: cuda when available
    stats_cache: str | None = None  # None: $LUMINA_CACHE/eval-stats (default ~/.cache/lumina-ray/eval-stats)
    is_splits: int = 10
    kid: KIDConfig = field(default_factory=KIDConfig)
    grid: int = 16  # samples in OUT/grid.png (0: none)
    out: str = "outputs/evaluate"
    # generate and score: --model with --prompts FILE, or --classes N --samples K
    model: str | None = None
    classes: int | None = None
    samples: int = 1  # per class (or per prompt)
    generation: GenerateConfig = field(default_factory=GenerateConfig)  # sampler settings etc.; model / out are set


def modality_of(cfg: EvaluateConfig) -> str:
    return "audio" if any(m in AUDIO_METRICS for m in cfg.metrics) else "image"


def validate(cfg: EvaluateConfig) -> None:
    """Every requirement of the chosen metrics, before any model loads or file is read."""
    known = IMAGE_METRICS + AUDIO_METRICS
    unknown = [m for m in cfg.metrics if m not in known]
    if unknown or not cfg.metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    if any(m in IMAGE_METRICS for m in cfg.metrics) and any(m in AUDIO_METRICS for m in cfg.metrics):
        raise ValueError(f"image metrics and audio metrics in one run ({', '.join(cfg.metrics)}): run one job per "
                         "modality")
    needs = {"fid": "feature_extractor", "kid": "feature_extractor", "is": "feature_extractor",
             "clip_score": "clip_model", "fad": "audio_model", "clap_score": "clap_model", "kl": "classifier"}
    flags = {"feature_extractor": "--feature-extractor", "clip_model": "--clip-model", "audio_model": "--audio-model",
             "clap_model": "--clap-model", "classifier": "--classifier"}
    for metric in cfg.metrics:
        if not getattr(cfg, needs[metric]):
            raise ValueError(f"{metric} needs {flags[needs[metric]]} PATH (a local path or s3://; nothing is "
                             "downloaded)")
    generating = bool(cfg.model)
    if generating and cfg.fake:
        raise ValueError("give --fake (score existing samples) or --model (generate them into OUT/samples), not both")
    if not generating and not cfg.fake:
        raise ValueError("nothing to score: give --fake URI, or --model with --prompts FILE or --classes N")
    if generating and bool(cfg.prompts) == (cfg.classes is not None):
        raise ValueError("generate and score needs exactly one of --prompts FILE and --classes N")
    if cfg.real and cfg.real_stats:
        raise ValueError("give --real (a set to compute statistics from) or --real-stats (a statistics file), not both")
    compared = [m for m in cfg.metrics if m in REFERENCE_METRICS]
    if compared and not (cfg.real or cfg.real_stats):
        raise ValueError(f"{', '.join(compared)} compare against real data: give --real URI or --real-stats FILE.npz")
    if "kl" in cfg.metrics and not cfg.real:
        raise ValueError("kl pairs each generated clip with the real clip of the same file name: give --real URI")
    if cfg.real_stats and modality_of(cfg) == "audio":
        raise ValueError("--real-stats holds image statistics; for audio give --real URI (its statistics are cached)")
    if cfg.kl_mode not in ("auto", "softmax", "sigmoid"):
        raise ValueError(f"kl_mode must be auto, softmax or sigmoid, got {cfg.kl_mode!r}")
    for name in ("batch_size", "is_splits", "samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.resolution is not None and cfg.resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {cfg.resolution}")


# ------------------------------------------------------------------------------------------------------------ sources


@dataclass
class Source:
    """A set of samples: ``names`` in order, its ``listing`` hash (names and sizes), and how to read it."""

    uri: str
    kind: str  # folder | shards | npz
    names: list[str]
    listing: str
    other_files: set[str] = field(default_factory=set)  # a folder's other files (JSON sidecars), relative names
    shard_rows: list[dict] = field(default_factory=list)


def open_source(uri: str, modality: str, limit: int | None = None) -> Source:
    """List ``uri``: an ``.npz`` image batch, a ``jobs.prepare`` output (``manifest.parquet``), or a folder (every file
    with a ``modality`` extension below it, in name order). An empty set is an error naming the extensions looked for."""
    from models.image_metrics import listing_hash
    from models.storage import filesystem, local_copy

    fs, root = filesystem(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"nothing at {uri}")
    if root.endswith(".npz"):
        from models.image_metrics import load_stats

        with local_copy(uri) as path:
            count = load_stats(path).images
        if not count:
            raise ValueError(f"{uri} has no image batch (arr_0): give it as --real-stats if it holds statistics")
        names = [f"arr_0[{i}]" for i in range(count)][:limit]
        return Source(uri, "npz", names, listing_hash([(os.path.basename(root), fs.size(root))]))
    if fs.exists(f"{root}/manifest.parquet"):
        from pipelines.shards import list_shards

        rows = list_shards(uri, modality=modality)
        if not rows:
            raise ValueError(f"{uri} is a jobs.prepare output without {modality} shards")
        names = [f"{row['path']}#{i}" for row in rows for i in range(row["samples"])][:limit]
        return Source(uri, "shards", names, listing_hash([(r["path"], r["bytes"]) for r in rows]), shard_rows=rows)
    extensions = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
    found = {os.path.relpath(path, root): int(info.get("size") or 0) for path, info in fs.find(root, detail=True).items()}
    sizes = {name: size for name, size in found.items() if name.rsplit(".", 1)[-1].lower() in extensions}
    if not sizes:
        raise ValueError(f"no {modality} files ({', '.join(extensions)}) under {uri}")
    names = sorted(sizes)[:limit]
    return Source(uri, "folder", names, listing_hash([(n, sizes[n]) for n in names]),
                  other_files=set(found) - set(sizes))


def read_source(source: Source, batch_size: int) -> Iterator[list[tuple[str, bytes | np.ndarray | Exception]]]:
    """Batches of (name, raw bytes — or a decoded array for .npz batches — or the exception reading it raised)."""
    from models.storage import filesystem, local_copy

    if source.kind == "npz":
        from models.image_metrics import iter_npz_images

        with local_copy(source.uri) as path:
            done = 0
            for batch in iter_npz_images(path, batch_size):
                rows = [(source.names[done + i], batch[i]) for i in range(min(len(batch), len(source.names) - done))]
                done += len(rows)
                if rows:
                    yield rows
                if done >= len(source.names):
                    return
        return
    if source.kind == "shards":
        yield from _read_shards(source, batch_size)
        return
    fs, root = filesystem(source.uri)
    for start in range(0, len(source.names), batch_size):
        names = source.names[start: start + batch_size]
        data = read_files(fs, [f"{root}/{name}" for name in names])
        yield [(name, data[f"{root}/{name}"]) for name in names]


def read_files(fs, paths: list[str]) -> dict[str, bytes | Exception]:
    """Each path's bytes, or the exception reading it raised. ``fs.cat`` of a list reads concurrently on object stores
    but takes names as glob patterns (``[``, ``*``, ``?``) and fails whole when none exists: such names, and any batch
    it fails on, are read one by one."""
    plain = [p for p in paths if not any(c in p for c in "*?[")]
    found: dict[str, Any] = {}
    try:
        found = fs.cat(plain, on_error="return") if plain else {}
    except OSError:
        pass
    out = {}
    for path in paths:
        if path in found:
            out[path] = found[path]
            continue
        try:
            out[path] = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - reported with the file, never fatal
            out[path] = exc
    return out


def _read_shards(source: Source, batch_size: int) -> Iterator[list[tuple[str, bytes | Exception]]]:
    """Each sample's image (the bucket-sized image member, else the original kept beside the latent) or original
    clip, in manifest order, up to the source's sample count."""
    from pipelines import constants as C
    from pipelines.shards import iter_samples, shard_url

    left, batch = len(source.names), []
    for row in source.shard_rows:
        for i, raw in enumerate(iter_samples(shard_url(source.uri, row["path"]), decode=False)):
            if left == 0:
                break
            meta = json.loads(raw.get(C.META_MEMBER, b"{}"))
            if row["modality"] == C.AUDIO:
                member = C.ORIGINAL_AUDIO_MEMBER if C.ORIGINAL_AUDIO_MEMBER in raw else None
            elif meta.get("member") in C.IMAGE_FORMATS:
                member = meta["member"]
            else:
                member = next((k for k in raw if k.startswith("orig.") and k[5:].lower() in IMAGE_EXTENSIONS), None)
            batch.append((f"{row['path']}#{i}", raw[member] if member else ValueError(
                f"no {row['modality']} in this sample (its tensor is {meta.get('member')}, and no original was kept: "
                "prepare with the originals kept, or score the source files)")))
            left -= 1
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def decode_image(data: bytes | np.ndarray, resolution: int | None) -> np.ndarray:
    """(H, W, 3) uint8; with ``resolution``: the shorter side scaled to it (bicubic) and the centre square cut, as the
    ADM suite prepares its reference images."""
    from PIL import Image

    if isinstance(data, np.ndarray):
        picture = Image.fromarray(data)
    else:
        picture = Image.open(io.BytesIO(data))
        picture.load()  # decode now: a truncated file fails here, not later
    picture = picture.convert("RGB")
    if resolution:
        scale = resolution / min(picture.size)
        size = (max(resolution, round(picture.width * scale)), max(resolution, round(picture.height * scale)))
        picture = picture.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        picture = picture.crop((left, top, left + resolution, top + resolution))
    return np.asarray(picture)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if wave.size == 0:
        raise ValueError("empty clip")
    return wave, rate


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:300]


# ------------------------------------------------------------------------------------------------------------ prompts


def read_prompts(cfg: EvaluateConfig, source: Source) -> dict[str, str]:
    """Each fake sample's prompt: ``--prompts`` JSON lines (``file``, ``prompt``) in score-only mode, else the
    ``prompt`` of the JSON sidecar beside each file (jobs.generate's)."""
    from models.storage import filesystem

    if cfg.prompts and not cfg.model:
        fs, path = filesystem(cfg.prompts)
        found = {}
        for number, line in enumerate(fs.cat_file(path).decode().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "file" not in row or "prompt" not in row:
                    raise ValueError(f"{cfg.prompts}:{number}: a prompts line needs file and prompt, got {line[:80]}")
                found[row["file"]] = row["prompt"]
        return found
    if source.kind != "folder":
        return {}
    fs, root = filesystem(source.uri)
    sidecars = {name: f"{name.rsplit('.', 1)[0]}.json" for name in source.names}
    sidecars = {name: f"{root}/{sidecar}" for name, sidecar in sidecars.items() if sidecar in source.other_files}
    data = read_files(fs, list(sidecars.values()))
    found = {}
    for name, path in sidecars.items():
        raw = data[path]
        if isinstance(raw, bytes):
            try:
                prompt = json.loads(raw).get("prompt")
            except (ValueError, AttributeError):
                prompt = None
            if isinstance(prompt, str):
                found[name] = prompt
    return found


# ------------------------------------------------------------------------------------------------------------ scoring


@dataclass
class Side:
    """What one pass over a set gave: features / logits / scores per metric, the samples kept for the grid, and the
    files that did not decode."""

    samples: int = 0
    bad: list[dict] = field(default_factory=list)
    features: Any = None  # StatsAccumulator
    logits: list = field(default_factory=list)
    scores: list = field(default_factory=list)  # CLIP / CLAP score per scored sample
    predictions: dict = field(default_factory=dict)  # file name → classifier logits (KL pairs clips by name)
    grid: list = field(default_factory=list)
    unprompted: int = 0


class Models:
    """The networks the chosen metrics need, each loaded once, on ``device``."""

    def __init__(self, cfg: EvaluateConfig, device: str):
        self.device = device
        self.extractor = self.clip = self.audio = self.clap = self.classifier = None
        metrics = set(cfg.metrics)
        if metrics & {"fid", "kid", "is"}:
            from models.image_features import load_image_features

            self.extractor = load_image_features(cfg.feature_extractor).to(device)
            if "is" in metrics and not self.extractor.has_logits:
                raise ValueError(f"is needs a classifier's logits: {cfg.feature_extractor} gives features only (use "
                                 "the FID Inception weights file)")
        if "clip_score" in metrics:
            from models.image_features import ClipScorer

            self.clip = ClipScorer(cfg.clip_model).to(device)
        if "fad" in metrics:
            from models.audio_metrics import AudioEmbeddings

            self.audio = AudioEmbeddings(cfg.audio_model).to(device)
        if "clap_score" in metrics:
            from models.audio_metrics import ClapScorer

            self.clap = ClapScorer(cfg.clap_model).to(device)
        if "kl" in metrics:
            from models.audio_metrics import AudioClassifier

            self.classifier = AudioClassifier(cfg.classifier).to(device)


def score_images(source: Source, cfg: EvaluateConfig, models: Models, metrics: set[str],
                 prompts: dict[str, str] | None = None, grid: int = 0) -> Side:
    """One pass over an image set: decode (bad files listed), batch consecutive images of one size, and feed each
    batch to the extractor (features, logits) and the CLIP scorer."""
    import torch

    from models.image_metrics import StatsAccumulator

    side = Side(features=StatsAccumulator(keep_features="kid" in metrics))

    def flush(group: list[tuple[str, np.ndarray]]) -> None:
        if not group:
            return
        images = torch.from_numpy(np.stack([image for _, image in group])).permute(0, 3, 1, 2).contiguous()
        if metrics & {"fid", "kid", "is"}:
            out = models.extractor(images)
            if metrics & {"fid", "kid"}:
                side.features.update(out["features"])
            if "is" in metrics:
                side.logits.append(out["logits"].cpu())
        if "clip_score" in metrics:
            keep = [i for i, (name, _) in enumerate(group) if name in prompts]
            side.unprompted += len(group) - len(keep)
            if keep:
                side.scores.append(models.clip(images[keep], [prompts[group[i][0]] for i in keep]).cpu())
        side.samples += len(group)

    for batch in read_source(source, cfg.batch_size):
        group: list[tuple[str, np.ndarray]] = []
        for name, data in batch:
            try:
                if isinstance(data, Exception):
                    raise data
                image = decode_image(data, cfg.resolution)
            except Exception as exc:  # noqa: BLE001 - an undecodable file is reported, never fatal
                side.bad.append({"file": name, "reason": reason(exc)})
                continue
            if len(side.grid) < grid:
                side.grid.append(image)
            if group and group[0][1].shape != image.shape:
                flush(group)
                group = []
            group.append((name, image))
        flush(group)
    return side


def score_audio(source: Source, cfg: EvaluateConfig, models: Models, metrics: set[str],
                prompts: dict[str, str] | None = None) -> Side:
    """One pass over a set of clips: decode (bad files listed) and feed each batch to the embedding model (FAD), the
    classifier (KL, kept per file name for the pairing) and the CLAP scorer."""
    from models.image_metrics import StatsAccumulator

    side = Side(features=StatsAccumulator(keep_features=False))
    for batch in read_source(source, cfg.batch_size):
        clips = []
        for name, data in batch:
            try:
                if isinstance(data, Exception):
                    raise data
                clips.append((name, *decode_audio(data)))
            except Exception as exc:  # noqa: BLE001 - an undecodable clip is reported, never fatal
                side.bad.append({"file": name, "reason": reason(exc)})
        for rate in sorted({r for _, _, r in clips}):  # one sample rate per model call
            group = [(name, wave) for name, wave, r in clips if r == rate]
            names, waves = [n for n, _ in group], [w for _, w in group]
            if "fad" in metrics:
                side.features.update(models.audio(waves, rate))
            if "kl" in metrics:
                side.predictions.update(zip(names, models.classifier(waves, rate).cpu().numpy()))
            if "clap_score" in metrics:
                keep = [i for i, n in enumerate(names) if n in prompts]
                side.unprompted += len(names) - len(keep)
                if keep:
                    side.scores.append(models.clap([waves[i] for i in keep], rate, [prompts[names[i]] for i in keep])
                                       .cpu())
            side.samples += len(group)
    return side


# ----------------------------------------------------------------------------------------------- reference statistics


def cache_dir(cfg: EvaluateConfig) -> str:
    root = os.environ.get("LUMINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lumina-ray")
    return cfg.stats_cache or os.path.join(root, "eval-stats")


def reference_stats(cfg: EvaluateConfig, models: Models, metrics: set[str]) -> tuple[Any, dict]:
    """The real side's ``FeatureStats`` for FID / KID / FAD and what it came from: ``--real-stats``, or the cache entry
    of (extractor, resolution, listing) — computed from ``--real`` and written there on a miss."""
    from fsspec.implementations.local import LocalFileSystem

    from models.image_metrics import FeatureStats, load_stats, save_stats, stats_key
    from models.storage import filesystem, local_copy

    modality = modality_of(cfg)
    network = models.extractor if modality == "image" else models.audio
    if cfg.real_stats:
        with local_copy(cfg.real_stats) as path:
            ref = load_stats(path)
        if ref.pool is None or ("kid" in metrics and ref.pool.features is None):
            if not ref.images:
                what = "features" if ref.pool is not None else "statistics"
                raise ValueError(f"{cfg.real_stats} has no {what} for {', '.join(sorted(metrics))} and no image batch "
                                 "(arr_0) to compute them from: give --real")
            source = open_source(cfg.real_stats, "image", cfg.limit)  # ADM's arr_0: extract, through the cache
        else:
            _check_extractor(ref.pool, network, cfg.real_stats, ref.adm)
            return ref.pool, {"uri": cfg.real_stats, "samples": ref.pool.n or None, "statistics": "file",
                              "adm": ref.adm}
    else:
        source = open_source(cfg.real, modality, cfg.limit)
    key = stats_key(network.id, cfg.resolution if modality == "image" else None,
                    f"{source.listing}:{len(source.names)}")
    fs, root = filesystem(cache_dir(cfg))
    cached = f"{root}/{key}"
    if fs.exists(cached):
        with local_copy(cached if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(cached)) as path:
            stats = load_stats(path).pool
        if "kid" not in metrics or stats.features is not None:
            log.info("real statistics from the cache: %s", cached)
            return stats, {"uri": source.uri, "samples": stats.n, "statistics": "cache", "cache_file": cached,
                           "bad": stats.meta.get("bad", [])}
    log.info("computing the real statistics of %s (%d samples)", source.uri, len(source.names))
    side = (score_images(source, cfg, models, metrics & {"fid", "kid"}) if modality == "image"
            else score_audio(source, cfg, models, {"fad"}))
    stats: FeatureStats = side.features.stats({"extractor": network.id, "resolution": cfg.resolution,
                                               "listing": source.listing, "uri": source.uri, "bad": side.bad})
    with tempfile.TemporaryDirectory(prefix="eval-stats-") as tmp:
        save_stats(os.path.join(tmp, key), stats)
        fs.makedirs(root, exist_ok=True)
        fs.put_file(os.path.join(tmp, key), cached)
    return stats, {"uri": source.uri, "samples": stats.n, "statistics": "computed", "cache_file": cached,
                   "bad": side.bad}


def _check_extractor(stats: Any, network: Any, where: str, adm: bool) -> None:
    """Statistics and features must come from the same network: ADM's are FID Inception's 2048 pool features."""
    from models.image_features import INCEPTION_NAME

    if adm:
        if not network.id.startswith(INCEPTION_NAME) or stats.mu.shape[0] != network.dim:
            raise ValueError(f"{where} holds the ADM suite's Inception pool statistics ({stats.mu.shape[0]}-d); "
                             f"--feature-extractor {network.id} is another network: give the FID Inception weights")
        return
    made_by = stats.meta.get("extractor")
    if made_by and made_by != network.id:
        raise ValueError(f"{where} was computed with {made_by}, not {network.id}: statistics of different networks "
                         "do not compare")


# ------------------------------------------------------------------------------------------------------------- driver


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score ``cfg.fake`` (generating it first in generate-and-score mode) and write the report; returns it."""
    import torch

    from models.image_metrics import inception_score, kernel_inception_distance
    from models.storage import join

    began = time.perf_counter()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    modality, metrics = modality_of(cfg), set(cfg.metrics)
    generated = None
    if cfg.model:
        generated = generate_samples(cfg)
        cfg.fake = join(cfg.out, SAMPLES_DIR)
    models = Models(cfg, device)
    fake = open_source(cfg.fake, modality, cfg.limit)
    prompts = read_prompts(cfg, fake) if metrics & {"clip_score", "clap_score"} else None
    if modality == "image":
        side = score_images(fake, cfg, models, metrics, prompts, cfg.grid)
    else:
        side = score_audio(fake, cfg, models, metrics, prompts)
    real_info: dict[str, Any] = {}
    results: dict[str, dict] = {}
    if metrics & {"fid", "kid", "fad"}:
        real, real_info = reference_stats(cfg, models, metrics)
        network = models.extractor if modality == "image" else models.audio
        fake_stats = side.features.stats()
        if metrics & {"fid", "fad"}:
            name = "fid" if modality == "image" else "fad"
            results[name] = {"value": real.frechet_distance(fake_stats), "real_samples": real.n or None,
                             "fake_samples": fake_stats.n, "extractor": network.id, "label": fd_label(network.id,
                                                                                                     modality)}
        if "kid" in metrics:
            mean, std = kernel_inception_distance(real.features, fake_stats.features, cfg.kid.subsets,
                                                  cfg.kid.subset_size, cfg.kid.seed)
            results["kid"] = {"value": mean, "std": std, "real_samples": real.n, "fake_samples": fake_stats.n,
                              "subsets": cfg.kid.subsets,
                              "subset_size": min(cfg.kid.subset_size, real.n, fake_stats.n),
                              "extractor": network.id}
    if "is" in metrics:
        mean, std = inception_score(torch.cat(side.logits), cfg.is_splits)
        results["is"] = {"value": mean, "std": std, "fake_samples": side.samples, "splits": cfg.is_splits,
                         "extractor": models.extractor.id}
    for name, scorer in (("clip_score", models.clip), ("clap_score", models.clap)):
        if name in metrics:
            if not side.scores:
                raise ValueError(f"{name}: no sample of {cfg.fake} has a prompt (give --prompts FILE, JSON lines "
                                 "with file and prompt, or keep jobs.generate's JSON sidecars beside the samples)")
            scores = torch.cat(side.scores)
            results[name] = {"value": float(scores.mean()), "std": float(scores.std(unbiased=False)),
                             "fake_samples": int(scores.numel()), "unprompted": side.unprompted, "model": scorer.id}
    if "kl" in metrics:
        results["kl"] = kl_result(cfg, models, side)
    report = {
        "mode": "generate" if cfg.model else "score", "modality": modality, "device": device,
        "fake": {"uri": cfg.fake, "samples": side.samples, "bad": side.bad, **({"generated": generated}
                                                                                 if generated else {})},
        "real": real_info, "metrics": results, "seconds": round(time.perf_counter() - began, 2),
        "config": to_dict(cfg),
    }
    write_report(cfg.out, report, side.grid)
    return report


def fd_label(extractor_id: str, modality: str) -> str:
    """How papers name the Fréchet distance in this feature space: FID, FD_DINOv2, FD_CLIP, FAD (FD_<type> else)."""
    from models.image_features import INCEPTION_NAME

    if modality == "audio":
        return "FAD"
    kind = extractor_id.split(":", 1)[0]
    if kind == INCEPTION_NAME:
        return "FID"
    return "FD_" + {"dinov2": "DINOv2", "clip": "CLIP"}.get(kind, kind)


def kl_result(cfg: EvaluateConfig, models: Models, fake: Side) -> dict:
    """KL between the classifier's predictions on each generated clip and on the real clip of the same relative file
    name (the pairing AudioLDM's evaluation uses)."""
    from models.audio_metrics import kl_divergence

    real_source = open_source(cfg.real, "audio", cfg.limit)
    real = score_audio(real_source, cfg, models, {"kl"})
    stem = {name.rsplit(".", 1)[0]: name for name in real.predictions}
    pairs = [(stem[n.rsplit(".", 1)[0]], n) for n in sorted(fake.predictions) if n.rsplit(".", 1)[0] in stem]
    if not pairs:
        raise ValueError(f"kl: no generated clip has a real clip of the same file name (stem) in {cfg.real}")
    mode = cfg.kl_mode if cfg.kl_mode != "auto" else ("sigmoid" if models.classifier.multi_label else "softmax")
    value = kl_divergence(np.stack([real.predictions[r] for r, _ in pairs]),
                          np.stack([fake.predictions[f] for _, f in pairs]), mode)
    return {"value": value, "pairs": len(pairs), "unpaired": len(fake.predictions) - len(pairs), "mode": mode,
            "model": models.classifier.id, "real_bad": real.bad}


# --------------------------------------------------------------------------------------------------- generate & score


def generation_rows(cfg: EvaluateConfig) -> list[dict]:
    """jobs.generate's request rows: each prompt of ``--prompts`` ``samples`` times, or ``samples`` per class index."""
    from jobs.generate import build_requests, read_prompt_file

    gen = generation_config(cfg)
    rows = read_prompt_file(cfg.prompts) if cfg.prompts else [{"prompt": str(c)} for c in range(cfg.classes)]
    return build_requests(gen, rows)


def generation_config(cfg: EvaluateConfig) -> GenerateConfig:
    from dataclasses import replace

    from models.storage import join

    return replace(cfg.generation, model=cfg.model, out=join(cfg.out, SAMPLES_DIR), images_per_prompt=cfg.samples,
                   prompts=[], prompt_file=cfg.prompts)


def pending(rows: list[dict], existing: set[str]) -> list[dict]:
    """The rows whose sample is not written yet: jobs.generate names each ``{index:06d}_{seed}`` with its JSON sidecar
    written first, so a sample counts as written when its image (or clip, or cloud) is there."""
    done = {name.split(".", 1)[0] for name in existing if not name.endswith(".json")}
    return [r for r in rows if f"{r['index']:06d}_{r['seed']}" not in done]


def generate_samples(cfg: EvaluateConfig) -> dict:
    """Write the samples into OUT/samples with jobs.generate's code (a prompt file as its Ray Data job), skipping those
    already there, so a stopped run resumes where it was."""
    from jobs.generate import output_fs, run_local, run_ray

    gen = generation_config(cfg)
    rows = generation_rows(cfg)
    fs, root = output_fs(gen.out)
    existing = {p.rsplit("/", 1)[-1] for p in fs.find(root)}
    todo = pending(rows, existing)
    log.info("generate: %d samples, %d already written", len(rows), len(rows) - len(todo))
    if todo:
        run_ray(gen, todo) if cfg.prompts else run_local(gen, todo)
    return {"model": cfg.model, "samples": len(rows), "skipped": len(rows) - len(todo), "out": gen.out}


def _base_from_metadata(model: str | None) -> EvaluateConfig | None:
    """Generate and score: the model folder's sampler defaults under every other source, as in jobs.generate."""
    from jobs.generate import _base_from_metadata as generate_base

    base = generate_base(model)
    return EvaluateConfig(generation=base) if base is not None else None


# ------------------------------------------------------------------------------------------------------------- report


def write_report(out: str, report: dict, grid: list[np.ndarray]) -> None:
    """``report.json``, ``report.md`` and (images) ``grid.png`` into ``out`` (local or s3://)."""
    from models.storage import filesystem

    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/report.json", json.dumps(report, indent=2, default=_plain).encode())
    fs.pipe_file(f"{root}/report.md", markdown(report).encode())
    if grid:
        fs.pipe_file(f"{root}/grid.png", grid_png(grid))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def markdown(report: dict) -> str:
    mode = f"Mode: {report['mode']} ({report['modality']}), {report['seconds']} s on {report['device']}."
    lines = ["# Evaluation", "", mode, "", "| metric | value | ± | real | fake | network |", "|---|---|---|---|---|---|"]
    for name, r in report["metrics"].items():
        label = r.get("label") or LABELS.get(name, name)
        std = f"{r['std']:.4g}" if "std" in r else ""
        lines.append(f"| {label} | {r['value']:.4f} | {std} | {r.get('real_samples') or r.get('pairs') or ''} | "
                     f"{r.get('fake_samples') or r.get('pairs') or ''} | {r.get('extractor') or r.get('model')} |")
    lines += ["", f"Fake: {report['fake']['uri']} ({report['fake']['samples']} samples)."]
    if report["real"]:
        real = report["real"]
        lines.append(f"Real: {real['uri']} ({real.get('samples') or 'statistics only'}; statistics: "
                     f"{real['statistics']}).")
    for where in ("fake", "real"):
        bad = report[where].get("bad") or []
        if bad:
            lines += ["", f"{len(bad)} {where} file(s) not scored:", ""]
            lines += [f"- `{b['file']}`: {b['reason']}" for b in bad[:50]]
            if len(bad) > 50:
                lines.append(f"- … and {len(bad) - 50} more (report.json lists them all)")
    if report["modality"] == "image" and report["fake"]["samples"]:
        lines += ["", "![samples](grid.png)"]
    return "\n".join(lines) + "\n"


def grid_png(images: list[np.ndarray], cell: int = 128) -> bytes:
    """The images as thumbnails (``cell`` px on the longer side, centred) on a near-square grid."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, image in enumerate(images):
        thumb = Image.fromarray(image)
        thumb.thumbnail((cell, cell))
        x, y = (i % cols) * cell + (cell - thumb.width) // 2, (i // cols) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.evaluate", __doc__.split("\n\n")[0], EvaluateConfig,
                         set_example="kid.subset_size=500")
    parser.add_argument("--real", help="real set: folder (local or s3://), jobs.prepare output or .npz image batch")
    parser.add_argument("--fake", help="generated set: folder, jobs.prepare output or .npz image batch")
    parser.add_argument("--real-stats", help="real statistics .npz: this job's cache file or an ADM reference batch")
    parser.add_argument("--metric", help=f"comma-separated: {', '.join(IMAGE_METRICS + AUDIO_METRICS)}")
    parser.add_argument("--feature-extractor", help="FID Inception weights file, or a transformers vision folder "
                                                    "(CLIP, DINOv2) for FD / KID")
    parser.add_argument("--clip-model", help="transformers CLIPModel folder (clip_score)")
    parser.add_argument("--audio-model", help="ClapModel or audio-encoder folder (fad)")
    parser.add_argument("--clap-model", help="ClapModel folder (clap_score)")
    parser.add_argument("--classifier", help="transformers audio classifier folder (kl)")
    parser.add_argument("--prompts", help="score only: JSON lines {file, prompt}; generate: a prompt file")
    parser.add_argument("--model", help="generate and score: the model folder (see jobs.generate)")
    parser.add_argument("--classes", type=int, help="generate and score: class indices 0…N-1 of a class model")
    parser.add_argument("--samples", type=int, help="generate and score: samples per class or prompt")
    parser.add_argument("--resolution", type=int, help="images: centre-crop and resize to this side first")
    parser.add_argument("--out", help="report folder (local or s3://)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    flags = {"real": args.real, "fake": args.fake, "real_stats": args.real_stats,
             "metrics": [m.strip() for m in args.metric.split(",") if m.strip()] if args.metric else None,
             "feature_extractor": args.feature_extractor, "clip_model": args.clip_model,
             "audio_model": args.audio_model, "clap_model": args.clap_model, "classifier": args.classifier,
             "prompts": args.prompts, "model": args.model, "classes": args.classes, "samples": args.samples,
             "resolution": args.resolution, "out": args.out}
    cfg = resolve_config(EvaluateConfig, args, flags, base=_base_from_metadata(args.model))
    try:
        validate(cfg)
        rows = generation_rows(cfg) if cfg.model else None
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc)) from exc
    from jobs.runtime import check_job_path

    check_job_path(cfg.out, "--out")
    if args.dry_run:
        print(json.dumps({"config": to_dict(cfg), "generate": len(rows) if rows is not None else 0}, indent=2))
        return 0
    report = evaluate(cfg)
    for name, result in report["metrics"].items():
        log.info("%s = %.4f", result.get("label", name), result["value"])
    log.info("report in %s", cfg.out)
    return 0


if __name__ == "__main__":
    run_main(main)
