"""The reusable half of ``jobs.evaluate``: read a set of samples (a folder of image or audio files, local or s3://, or
an ``.npz`` image batch, ADM's ``arr_0``), listing the files that do not decode with their reason; load the networks a
set of metrics needs; score a set in one pass (features and their running statistics, logits, CLIP / CLAP scores);
cache a reference set's statistics; turn both sides into the metrics' results; write the report (JSON, Markdown, PNG
grid). Pure torch / numpy / fsspec, beside the metrics themselves (``models.image_metrics``,
``models.image_features``, ``models.audio_metrics``): the job adds the command line, ``jobs.prepare`` shards (read
through ``pipelines``) and generation (jobs.generate's Ray Data job). docs/evaluation.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("models.evaluation")

IMAGE_METRICS = ("fid", "sfid", "kid", "is", "precision", "recall", "clip_score")
AUDIO_METRICS = ("fad", "kl", "clap_score")
POINT_METRICS = ("mmd_cd", "cov_cd", "1nna_cd")  # models.point_metrics: the paper's §5.3 (PointFlow's protocol)
REFERENCE_METRICS = ("fid", "sfid", "kid", "precision", "recall", "fad", "kl", *POINT_METRICS)  # against the real set
EXTRACTOR_METRICS = {"fid", "sfid", "kid", "is", "precision", "recall"}  # the image metrics of --feature-extractor
POOL_METRICS = {"fid", "kid", "precision", "recall"}  # compared in the pool feature space (FID's, DINOv2's, …)
KEEP_FEATURES = {"kid", "precision", "recall"}  # need every real feature vector, not only (μ, Σ)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
LABELS = {"sfid": "sFID", "kid": "KID", "is": "IS", "precision": "precision", "recall": "recall", "mmd_cd": "MMD-CD",
          "cov_cd": "COV-CD", "1nna_cd": "1-NNA-CD",
          "clip_score": "CLIP score", "kl": "KL", "clap_score": "CLAP score"}


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
    # a source that brings its own reader (batch_size → batches): the job's jobs.prepare shards, read through
    # pipelines.shards, which this layer does not import
    reader: Callable[[int], Iterator[list[tuple[str, Any]]]] | None = None


def open_source(uri: str, modality: str, limit: int | None = None,
                extensions: tuple[str, ...] | None = None) -> Source:
    """List ``uri``: an ``.npz`` image batch, or a folder (every file with a ``modality`` extension — or one of
    ``extensions`` — below it, in name order). An empty set is an error naming the extensions looked for.
    (``jobs.evaluate`` lists ``jobs.prepare`` outputs itself: their shards are read through ``pipelines``.)"""
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
    extensions = extensions or (IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS)
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
    if source.reader is not None:
        yield from source.reader(batch_size)
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


def prompt_lines(uri: str) -> dict[str, str]:
    """``--prompts`` of score-only mode: JSON lines ``{"file": …, "prompt": …}``, ``file`` relative to the set."""
    from models.storage import filesystem

    fs, path = filesystem(uri)
    found = {}
    for number, line in enumerate(fs.cat_file(path).decode().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "file" not in row or "prompt" not in row:
                raise ValueError(f"{uri}:{number}: a prompts line needs file and prompt, got {line[:80]}")
            found[row["file"]] = row["prompt"]
    return found


def sidecar_prompts(source: Source) -> dict[str, str]:
    """Each sample's prompt from the JSON sidecar beside it (jobs.generate's), for a folder; none otherwise."""
    from models.storage import filesystem

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
    spatial: Any = None  # StatsAccumulator of sFID's spatial features
    logits: list = field(default_factory=list)
    scores: list = field(default_factory=list)  # CLIP / CLAP score per scored sample
    predictions: dict = field(default_factory=dict)  # file name → classifier logits (KL pairs clips by name)
    grid: list = field(default_factory=list)
    unprompted: int = 0


class Models:
    """The networks the chosen metrics need, each loaded once, on ``device``."""

    def __init__(self, metrics: set[str], device: str, feature_extractor: str | None = None,
                 clip_model: str | None = None, audio_model: str | None = None, clap_model: str | None = None,
                 classifier: str | None = None):
        self.device = device
        self.extractor = self.clip = self.audio = self.clap = self.classifier = None
        if metrics & EXTRACTOR_METRICS:
            from models.image_features import load_image_features

            self.extractor = load_image_features(feature_extractor).to(device)
            if "is" in metrics and not self.extractor.has_logits:
                raise ValueError(f"is needs a classifier's logits: {feature_extractor} gives features only (use "
                                 "the FID Inception weights file)")
            if "sfid" in metrics and not self.extractor.has_spatial:
                raise ValueError(f"sfid needs Inception's spatial features (mixed_6/conv): {feature_extractor} "
                                 "is not the FID Inception weights file")
        if "clip_score" in metrics:
            from models.image_features import ClipScorer

            self.clip = ClipScorer(clip_model).to(device)
        if "fad" in metrics:
            from models.audio_networks import load_audio_embeddings

            self.audio = load_audio_embeddings(audio_model).to(device)
        if "clap_score" in metrics:
            from models.audio_metrics import ClapScorer

            self.clap = ClapScorer(clap_model).to(device)
        if "kl" in metrics:
            from models.audio_networks import load_audio_classifier

            self.classifier = load_audio_classifier(classifier).to(device)


def score_images(source: Source, models: Models, metrics: set[str], batch_size: int, resolution: int | None = None,
                 prompts: dict[str, str] | None = None, grid: int = 0) -> Side:
    """One pass over an image set: decode (bad files listed), batch consecutive images of one size, and feed each
    batch to the extractor (features, logits) and the CLIP scorer."""
    import torch

    from models.image_metrics import StatsAccumulator

    side = Side(features=StatsAccumulator(keep_features=bool(metrics & KEEP_FEATURES)),
                spatial=StatsAccumulator(keep_features=False))

    def flush(group: list[tuple[str, np.ndarray]]) -> None:
        if not group:
            return
        images = torch.from_numpy(np.stack([image for _, image in group])).permute(0, 3, 1, 2).contiguous()
        if metrics & EXTRACTOR_METRICS:
            out = models.extractor(images)
            if metrics & (POOL_METRICS | {"sfid"}):  # sFID's reference files hold the pool statistics too
                side.features.update(out["features"])
            if "sfid" in metrics:
                side.spatial.update(out["spatial"])
            if "is" in metrics:
                side.logits.append(out["logits"].cpu())
        if "clip_score" in metrics:
            keep = [i for i, (name, _) in enumerate(group) if name in prompts]
            side.unprompted += len(group) - len(keep)
            if keep:
                side.scores.append(models.clip(images[keep], [prompts[group[i][0]] for i in keep]).cpu())
        side.samples += len(group)

    for batch in read_source(source, batch_size):
        group: list[tuple[str, np.ndarray]] = []
        for name, data in batch:
            try:
                if isinstance(data, Exception):
                    raise data
                image = decode_image(data, resolution)
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


def score_audio(source: Source, models: Models, metrics: set[str], batch_size: int,
                prompts: dict[str, str] | None = None) -> Side:
    """One pass over a set of clips: decode (bad files listed) and feed each batch to the embedding model (FAD), the
    classifier (KL, kept per file name for the pairing) and the CLAP scorer."""
    from models.image_metrics import StatsAccumulator

    side = Side(features=StatsAccumulator(keep_features=False))
    for batch in read_source(source, batch_size):
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


def set_stats(source: Source, models: Models, metrics: set[str], modality: str, cache: str, batch_size: int,
              resolution: int | None = None) -> tuple[Any, Any, dict]:
    """The real side's ``FeatureStats`` of a set of files (pool features; with ``sfid`` also the spatial ones, else
    None) and what they came from: the entry of (extractor, resolution, listing) in the ``cache`` folder (local or
    s3://), computed and written there on a miss. A cached file that lacks what these metrics need (features for KID,
    precision and recall; spatial statistics for sFID) is computed again and replaced."""
    from fsspec.implementations.local import LocalFileSystem

    from models.image_metrics import FeatureStats, load_stats, save_stats, stats_key
    from models.storage import filesystem, local_copy

    network = models.extractor if modality == "image" else models.audio
    needs_features, needs_spatial = bool(metrics & KEEP_FEATURES), "sfid" in metrics
    key = stats_key(network.id, resolution if modality == "image" else None,
                    f"{source.listing}:{len(source.names)}")
    fs, root = filesystem(cache)
    cached = f"{root}/{key}"
    if fs.exists(cached):
        with local_copy(cached if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(cached)) as path:
            entry = load_stats(path)
        stats = entry.pool
        if (not needs_features or stats.features is not None) and (not needs_spatial or entry.spatial is not None):
            log.info("real statistics from the cache: %s", cached)
            return stats, entry.spatial if needs_spatial else None, {
                "uri": source.uri, "samples": stats.n, "statistics": "cache", "cache_file": cached,
                "bad": stats.meta.get("bad", [])}
    log.info("computing the real statistics of %s (%d samples)", source.uri, len(source.names))
    side = (score_images(source, models, metrics & (POOL_METRICS | {"sfid"}), batch_size, resolution) if modality == "image"
            else score_audio(source, models, {"fad"}, batch_size))
    meta = {"extractor": network.id, "resolution": resolution, "listing": source.listing, "uri": source.uri,
            "bad": side.bad}
    stats: FeatureStats = side.features.stats(meta)
    spatial = side.spatial.stats(meta) if needs_spatial else None
    with tempfile.TemporaryDirectory(prefix="eval-stats-") as tmp:
        save_stats(os.path.join(tmp, key), stats, spatial)
        fs.makedirs(root, exist_ok=True)
        fs.put_file(os.path.join(tmp, key), cached)
    return stats, spatial, {"uri": source.uri, "samples": stats.n, "statistics": "computed", "cache_file": cached,
                            "bad": side.bad}


def check_extractor(stats: Any, network: Any, where: str, adm: bool) -> None:
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


# ------------------------------------------------------------------------------------------------------------ results


def compare(metrics: set[str], side: Side, real: Any, real_spatial: Any, network: Any, modality: str,
            device: str = "cpu", kid_subsets: int = 100, kid_subset_size: int = 1000, kid_seed: int = 0,
            nearest_k: int = 3) -> dict[str, dict]:
    """The results of the metrics that compare against the real set (FID / FAD, KID, sFID, precision, recall): the
    generated ``side`` against the real statistics ``real`` (and ``real_spatial`` for sFID) in ``network``'s space."""
    from models.image_metrics import kernel_inception_distance, precision_recall

    results: dict[str, dict] = {}
    fake_stats = side.features.stats()
    # the real vectors KID, precision and recall compare: with ADM's file, its arr_0 sample, not the n of its (μ, Σ)
    real_n = len(real.features) if real.features is not None else real.n
    if metrics & {"fid", "fad"}:
        name = "fid" if modality == "image" else "fad"
        results[name] = {"value": real.frechet_distance(fake_stats), "real_samples": real.n or None,
                         "fake_samples": fake_stats.n, "extractor": network.id, "label": fd_label(network.id,
                                                                                                 modality)}
        if modality == "audio":  # VGGish embeds every 0.96 s of a clip (the FAD paper's unit), the others a clip
            results[name]["vectors"] = getattr(network, "vector_unit", "clip")
    if "kid" in metrics:
        mean, std = kernel_inception_distance(real.features, fake_stats.features, kid_subsets,
                                              kid_subset_size, kid_seed)
        results["kid"] = {"value": mean, "std": std, "real_samples": real_n, "fake_samples": fake_stats.n,
                          "subsets": kid_subsets,
                          "subset_size": min(kid_subset_size, real_n, fake_stats.n),
                          "extractor": network.id}
    if "sfid" in metrics:
        fake_spatial = side.spatial.stats()
        results["sfid"] = {"value": real_spatial.frechet_distance(fake_spatial),
                           "real_samples": real_spatial.n or None, "fake_samples": fake_spatial.n,
                           "extractor": network.id, "label": "sFID"}
    if metrics & {"precision", "recall"}:
        values = dict(zip(("precision", "recall"), precision_recall(real.features, fake_stats.features,
                                                                     nearest_k, device=device)))
        for name in ("precision", "recall"):
            if name in metrics:
                results[name] = {"value": values[name], "real_samples": real_n, "fake_samples": fake_stats.n,
                                 "k": nearest_k, "extractor": network.id}
    return results


def own_results(metrics: set[str], side: Side, models: Models, fake_uri: str, is_splits: int = 10) -> dict[str, dict]:
    """The results of the metrics of the generated set alone: IS, CLIP score, CLAP score."""
    import torch

    from models.image_metrics import inception_score

    results: dict[str, dict] = {}
    if "is" in metrics:
        mean, std = inception_score(torch.cat(side.logits), is_splits)
        results["is"] = {"value": mean, "std": std, "fake_samples": side.samples, "splits": is_splits,
                         "extractor": models.extractor.id}
    for name, scorer in (("clip_score", models.clip), ("clap_score", models.clap)):
        if name in metrics:
            if not side.scores:
                raise ValueError(f"{name}: no sample of {fake_uri} has a prompt (give --prompts FILE, JSON lines "
                                 "with file and prompt, or keep jobs.generate's JSON sidecars beside the samples)")
            scores = torch.cat(side.scores)
            results[name] = {"value": float(scores.mean()), "std": float(scores.std(unbiased=False)),
                             "fake_samples": int(scores.numel()), "unprompted": side.unprompted, "model": scorer.id}
    return results


def fd_label(extractor_id: str, modality: str) -> str:
    """How papers name the Fréchet distance in this feature space: FID, FD_DINOv2, FD_CLIP, FAD (FD_<type> else)."""
    from models.image_features import INCEPTION_NAME

    if modality == "audio":
        return "FAD"
    kind = extractor_id.split(":", 1)[0]
    if kind == INCEPTION_NAME:
        return "FID"
    return "FD_" + {"dinov2": "DINOv2", "clip": "CLIP"}.get(kind, kind)


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
                     f"{r.get('fake_samples') or r.get('pairs') or ''} | "
                     f"{r.get('extractor') or r.get('model') or ''} |")
    lines += ["", f"Fake: {report['fake']['uri']} ({report['fake']['samples']} samples)."]
    if report["real"]:
        real = report["real"]
        statistics = f"; statistics: {real['statistics']}" if "statistics" in real else ""
        lines.append(f"Real: {real['uri']} ({real.get('samples') or 'statistics only'}{statistics}).")
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
