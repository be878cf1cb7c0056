"""``python -m jobs.evaluate``: score generated images, clips or point clouds against a real set — FID (or FD in any
feature space: FD_DINOv2, FD_CLIP), sFID, KID, IS, precision / recall, CLIP score; FAD, KL, CLAP score; MMD-CD, COV-CD,
1-NNA-CD — into ``OUT/report.json``, ``OUT/report.md`` and a PNG grid of samples.

    python -m jobs.evaluate --real URI --fake URI --metric fid,kid,is,clip_score \
        --feature-extractor pt_inception-2015-12-05-6726825d.pth --clip-model CLIP_FOLDER --out DIR
    python -m jobs.evaluate --real-stats VIRTUAL_imagenet256_labeled.npz --fake SAMPLES --metric fid \
        --feature-extractor pt_inception-2015-12-05-6726825d.pth --out DIR
    python -m jobs.evaluate --model MODEL --prompts PROMPTS.txt --real URI --metric fid,clip_score … --out DIR
    python -m jobs.evaluate --model MODEL --classes 1000 --samples 50 --real-stats VIRTUAL_imagenet256_labeled.npz \
        --metric fid,sfid,is,precision,recall --feature-extractor pt_inception-2015-12-05-6726825d.pth --out DIR
    python -m jobs.evaluate --real SHAPENET_TEST/ --fake CLOUDS/ --metric mmd_cd,cov_cd,1nna_cd --out DIR

Score only: ``--real`` and ``--fake`` are folders of PNG / JPEG / WebP (or WAV / FLAC / MP3 / OGG) files, local or
``s3://``, a ``jobs.prepare`` output (its image shards, its audio shards' original clips, its point shards' clouds), or
an ``.npz`` image batch (ADM's ``arr_0``); point clouds are folders of ``.npy`` / ``.npz`` / ``.ply`` clouds or
``.obj`` / ``.off`` meshes, read as jobs.prepare reads them. ``--real-stats FILE.npz`` instead gives the real side's
statistics: a file this job cached (of images, or of clips for FAD), or an ADM reference batch (``mu`` / ``sigma``,
docs/evaluation.md#the-adm-reference-format). The real side's statistics are computed once per extractor, resolution
and file listing and cached as ``.npz`` (``stats_cache``). Generate and score:
``--model`` with ``--prompts FILE`` (jobs.generate's prompt file) or ``--classes N --samples K`` (a class-conditional
model, K per class) first writes the samples into ``OUT/samples`` through jobs.generate's Ray Data job (its
``--prompt-file`` path, one sampler per GPU), skipping those already there, then scores them as ``--fake``. The reading,
scoring and report code is ``models.evaluation``; this job adds the command line, ``jobs.prepare`` shards and
generation.

Extractors and models are local paths (or ``s3://``), never downloaded: ``--feature-extractor`` the FID Inception
weights file or a transformers vision folder (CLIP, DINOv2), ``--clip-model`` a CLIPModel folder, ``--audio-model`` a
ClapModel or audio-encoder folder, or the VGGish or PANNs CNN14 weights file (FAD), ``--clap-model`` a ClapModel
folder, ``--classifier`` an audio classifier folder or the CNN14 weights file (KL). The CLIP and CLAP scores take
each sample's prompt from ``--prompts FILE`` (JSON lines with ``file``, relative to ``--fake``, and ``prompt``) or
from the JSON sidecar jobs.generate writes beside it. A file that does not decode is counted and listed in the report
with its reason; the rest are scored. Details: docs/evaluation.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.generate import GenerateConfig
from models.config_io import ConfigError, to_dict
from models.evaluation import (
    AUDIO_METRICS,
    EXTRACTOR_METRICS,
    IMAGE_EXTENSIONS,
    IMAGE_METRICS,
    KEEP_FEATURES,
    LABELS,
    POINT_METRICS,
    REFERENCE_METRICS,
    Models,
    Side,
    Source,
    check_extractor,
    compare,
    own_results,
    prompt_lines,
    score_audio,
    score_images,
    set_stats,
    sidecar_prompts,
    write_report,
)

log = logging.getLogger("jobs.evaluate")

SAMPLES_DIR = "samples"  # generate-and-score: OUT/samples



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
    audio_model: str | None = None  # fad: a ClapModel / transformers audio encoder folder, or VGGish / CNN14 weights
    clap_model: str | None = None  # clap_score: a ClapModel folder
    classifier: str | None = None  # kl: a transformers audio classifier folder (AST on AudioSet, …) or CNN14 weights
    kl_mode: str = "auto"  # softmax | sigmoid | auto (sigmoid for a multi-label classifier)
    prompts: str | None = None  # score only: JSON lines {file, prompt}; generate: jobs.generate's prompt file
    resolution: int | None = None  # images: centre-crop and resize to this side first (None: as stored)
    limit: int | None = None  # at most this many samples per side (the first in name order)
    batch_size: int = 32
    device: str = "auto"  # auto: cuda when available
    stats_cache: str | None = None  # None: $LUMINA_CACHE/eval-stats (default ~/.cache/lumina-ray/eval-stats)
    is_splits: int = 10
    nearest_k: int = 3  # precision / recall: the k of the k-NN balls (Kynkäänniemi et al. 2019, the ADM suite)
    kid: KIDConfig = field(default_factory=KIDConfig)
    grid: int = 16  # samples in OUT/grid.png (0: none)
    # point clouds: each cloud is cut to this many points (a fixed random subset), or to its set's smallest cloud
    points: int = 2048
    out: str = "outputs/evaluate"
    # generate and score: --model with --prompts FILE, or --classes N --samples K
    model: str | None = None
    classes: int | None = None
    samples: int = 1  # per class (or per prompt)
    generation: GenerateConfig = field(default_factory=GenerateConfig)  # sampler settings etc.; model / out are set


METRICS_OF = {"image": IMAGE_METRICS, "audio": AUDIO_METRICS, "points": POINT_METRICS}


def modality_of(cfg: EvaluateConfig) -> str:
    return next((m for m in ("audio", "points") if any(x in METRICS_OF[m] for x in cfg.metrics)), "image")


def validate(cfg: EvaluateConfig) -> None:
    """Every requirement of the chosen metrics, before any model loads or file is read."""
    known = IMAGE_METRICS + AUDIO_METRICS + POINT_METRICS
    unknown = [m for m in cfg.metrics if m not in known]
    if unknown or not cfg.metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    modalities = [name for name, metrics in METRICS_OF.items() if any(m in metrics for m in cfg.metrics)]
    if len(modalities) > 1:
        raise ValueError(f"{' and '.join(modalities)} metrics in one run ({', '.join(cfg.metrics)}): run one job per "
                         "modality")
    needs = {**{m: "feature_extractor" for m in EXTRACTOR_METRICS},
             "clip_score": "clip_model", "fad": "audio_model", "clap_score": "clap_model", "kl": "classifier"}
    flags = {"feature_extractor": "--feature-extractor", "clip_model": "--clip-model", "audio_model": "--audio-model",
             "clap_model": "--clap-model", "classifier": "--classifier"}
    for metric in cfg.metrics:
        if metric in needs and not getattr(cfg, needs[metric]):
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
    if modalities == ["points"] and not cfg.real:
        raise ValueError("point metrics compare clouds pair by pair: give --real (a folder of clouds or meshes, or a "
                         "jobs.prepare output with point shards), not a statistics file")
    if cfg.kl_mode not in ("auto", "softmax", "sigmoid"):
        raise ValueError(f"kl_mode must be auto, softmax or sigmoid, got {cfg.kl_mode!r}")
    for name in ("batch_size", "is_splits", "samples", "nearest_k", "points"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.resolution is not None and cfg.resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {cfg.resolution}")


# ------------------------------------------------------------------------------------------------------------ sources


def open_source(uri: str, modality: str, limit: int | None = None) -> Source:
    """``models.evaluation.open_source``, plus a ``jobs.prepare`` output (``manifest.parquet``): its shards' samples in
    manifest order, read through ``pipelines.shards``."""
    from models import evaluation
    from models.image_metrics import listing_hash
    from models.storage import filesystem

    fs, root = filesystem(uri)
    if fs.exists(root) and not root.endswith(".npz") and fs.exists(f"{root}/manifest.parquet"):
        from pipelines.shards import list_shards

        rows = list_shards(uri, modality=modality)
        if not rows:
            raise ValueError(f"{uri} is a jobs.prepare output without {modality} shards")
        names = [f"{row['path']}#{i}" for row in rows for i in range(row["samples"])][:limit]
        source = Source(uri, "shards", names, listing_hash([(r["path"], r["bytes"]) for r in rows]), shard_rows=rows)
        source.reader = functools.partial(_read_shards, source)
        return source
    if modality == "points":
        from pipelines.constants import POINTS_EXTENSIONS

        source = evaluation.open_source(uri, modality, extensions=POINTS_EXTENSIONS)
        source.names = one_file_per_sample(source.names)[:limit]
        return source
    return evaluation.open_source(uri, modality, limit)


def one_file_per_sample(names: list[str]) -> list[str]:
    """One file per sample stem: jobs.generate writes a cloud as ``.npy`` (its float32 points) and ``.ply`` (the same
    points), so a folder of its samples holds each twice; the first of npy, npz, ply, obj, off is kept."""
    order = ("npy", "npz", "ply", "obj", "off")
    best: dict[str, str] = {}
    for name in sorted(names, key=lambda n: order.index(n.rsplit(".", 1)[1].lower())):
        best.setdefault(name.rsplit(".", 1)[0], name)
    return sorted(best.values())


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
            elif row["modality"] == C.POINTS:
                member = C.POINTS_MEMBER if C.POINTS_MEMBER in raw else None
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


def read_prompts(cfg: EvaluateConfig, source: Source) -> dict[str, str]:
    """Each fake sample's prompt: ``--prompts`` JSON lines (``file``, ``prompt``) in score-only mode, else the
    ``prompt`` of the JSON sidecar beside each file (jobs.generate's)."""
    return prompt_lines(cfg.prompts) if cfg.prompts and not cfg.model else sidecar_prompts(source)


def load_models(cfg: EvaluateConfig, device: str) -> Models:
    return Models(set(cfg.metrics), device, feature_extractor=cfg.feature_extractor, clip_model=cfg.clip_model,
                  audio_model=cfg.audio_model, clap_model=cfg.clap_model, classifier=cfg.classifier)


# ----------------------------------------------------------------------------------------------- reference statistics


def cache_dir(cfg: EvaluateConfig) -> str:
    root = os.environ.get("LUMINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lumina-ray")
    return cfg.stats_cache or os.path.join(root, "eval-stats")


def reference_stats(cfg: EvaluateConfig, models: Models, metrics: set[str]) -> tuple[Any, Any, dict]:
    """The real side's ``FeatureStats`` for FID / KID / precision / recall / FAD, its spatial ones for sFID (None when
    not asked for), and what they came from: ``--real-stats``, or the cache entry of (extractor, resolution,
    listing) — computed from ``--real`` and written there on a miss.

    A statistics file without the features KID, precision and recall need (ADM's references) gives its ``arr_0``
    images' features, through the cache, while the Fréchet distances keep the file's own statistics: ADM's ``mu`` /
    ``sigma`` describe the whole reference set (all of ImageNet's training images), ``arr_0`` only a sample of it."""
    from models.image_metrics import FeatureStats, load_stats
    from models.storage import local_copy

    modality = modality_of(cfg)
    network = models.extractor if modality == "image" else models.audio
    needs_features, needs_spatial = bool(metrics & KEEP_FEATURES), "sfid" in metrics
    if not cfg.real_stats:
        return _set_stats(cfg, models, metrics, open_source(cfg.real, modality, cfg.limit))
    with local_copy(cfg.real_stats) as path:
        ref = load_stats(path)
    has_statistics = ref.pool is not None and (ref.spatial is not None or not needs_spatial)
    spatial = ref.spatial if needs_spatial else None
    info = {"uri": cfg.real_stats, "samples": (ref.pool.n or None) if ref.pool else None, "statistics": "file",
            "adm": ref.adm}
    if has_statistics and (ref.pool.features is not None or not needs_features):
        check_extractor(ref.pool, network, cfg.real_stats, ref.adm)
        return ref.pool, spatial, info
    if not ref.images:
        missing = ("features" if has_statistics else "statistics" if ref.pool is None
                   else "spatial statistics (mu_s, sigma_s)")
        raise ValueError(f"{cfg.real_stats} has no {missing} for {', '.join(sorted(metrics))} and no image batch "
                         "(arr_0) to compute them from: give --real, or a cache file this job wrote for them")
    # ADM's arr_0: extract, through the cache
    stats, computed_spatial, computed = _set_stats(cfg, models, metrics, open_source(cfg.real_stats, "image",
                                                                                     cfg.limit))
    if not (has_statistics and metrics & {"fid", "sfid"}):  # no Fréchet distance wants the file's statistics
        return stats, computed_spatial, computed
    check_extractor(ref.pool, network, cfg.real_stats, ref.adm)
    pool = FeatureStats(ref.pool.mu, ref.pool.sigma, ref.pool.n, stats.features, ref.pool.meta)
    return pool, spatial, {**info, "features": computed["statistics"], "feature_samples": stats.n,
                           "cache_file": computed["cache_file"], "bad": computed["bad"]}


def _set_stats(cfg: EvaluateConfig, models: Models, metrics: set[str], source: Source) -> tuple[Any, Any, dict]:
    return set_stats(source, models, metrics, modality_of(cfg), cache_dir(cfg), cfg.batch_size, cfg.resolution)


# ------------------------------------------------------------------------------------------------------------- driver


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score ``cfg.fake`` (generating it first in generate-and-score mode) and write the report; returns it."""
    import torch

    from models.storage import join

    began = time.perf_counter()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    modality, metrics = modality_of(cfg), set(cfg.metrics)
    generated = None
    if cfg.model:
        generated = generate_samples(cfg)
        cfg.fake = join(cfg.out, SAMPLES_DIR)
    if modality == "points":
        return evaluate_points(cfg, device, generated, began)
    models = load_models(cfg, device)
    fake = open_source(cfg.fake, modality, cfg.limit)
    prompts = read_prompts(cfg, fake) if metrics & {"clip_score", "clap_score"} else None
    if modality == "image":
        side = score_images(fake, models, metrics, cfg.batch_size, cfg.resolution, prompts, cfg.grid)
    else:
        side = score_audio(fake, models, metrics, cfg.batch_size, prompts)
    real_info: dict[str, Any] = {}
    results: dict[str, dict] = {}
    if metrics & (set(REFERENCE_METRICS) - {"kl"}):
        real, real_spatial, real_info = reference_stats(cfg, models, metrics)
        network = models.extractor if modality == "image" else models.audio
        results.update(compare(metrics, side, real, real_spatial, network, modality, device, cfg.kid.subsets,
                               cfg.kid.subset_size, cfg.kid.seed, cfg.nearest_k))
    results.update(own_results(metrics, side, models, cfg.fake, cfg.is_splits))
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


def evaluate_points(cfg: EvaluateConfig, device: str, generated: dict | None, began: float) -> dict:
    """MMD-CD, COV-CD and 1-NNA-CD (models.point_metrics, paper §5.3) of the generated clouds against the real ones:
    every cloud read as jobs.prepare reads it (meshes sampled on their surface, all placed on the unit sphere), cut to
    ``cfg.points`` points, then the Chamfer matrices on ``device``."""
    import torch

    from models.point_metrics import chamfer_matrix, mmd_cov_of, one_nna_of

    fake_side, fake = read_clouds(open_source(cfg.fake, "points", cfg.limit), cfg)
    real_side, real = read_clouds(open_source(cfg.real, "points", cfg.limit), cfg)
    g, r = torch.from_numpy(fake).to(device), torch.from_numpy(real).to(device)
    d_gr, metrics = chamfer_matrix(g, r), set(cfg.metrics)
    values = mmd_cov_of(d_gr)
    if "1nna_cd" in metrics:
        values["1nna_cd"] = one_nna_of(chamfer_matrix(g, g), d_gr, chamfer_matrix(r, r))
    results = {name: {"value": values[name], "real_samples": len(real), "fake_samples": len(fake),
                      "points": {"fake": int(fake.shape[1]), "real": int(real.shape[1])}, "label": LABELS[name]}
               for name in POINT_METRICS if name in metrics}
    report = {
        "mode": "generate" if cfg.model else "score", "modality": "points", "device": device,
        "fake": {"uri": cfg.fake, "samples": fake_side.samples, "bad": fake_side.bad,
                 **({"generated": generated} if generated else {})},
        "real": {"uri": cfg.real, "samples": real_side.samples, "bad": real_side.bad}, "metrics": results,
        "seconds": round(time.perf_counter() - began, 2), "config": to_dict(cfg),
    }
    write_report(cfg.out, report, [])
    return report


def read_clouds(source: Source, cfg: EvaluateConfig) -> tuple[Side, Any]:
    """A set's clouds as one (B, N, 3) float32 array: each file decoded by jobs.prepare's own reader (point arrays and
    PLY as they are, meshes sampled on their surface; every cloud centred and scaled onto the unit sphere, the space
    the models generate in), files that do not decode listed with their reason; N is ``cfg.points``, or the set's
    smallest cloud if that has fewer, each cloud keeping a fixed random subset of its points."""
    import numpy as np

    from models.evaluation import read_source, reason
    from pipelines.config import PointsDecodeConfig
    from pipelines.decode import decode_points

    side, clouds = Side(), []
    for batch in read_source(source, cfg.batch_size):
        for name, data in batch:
            try:
                if isinstance(data, Exception):
                    raise data
                ext = "npy" if source.kind == "shards" else name.rsplit(".", 1)[-1].lower()
                clouds.append(decode_points(data, ext, PointsDecodeConfig(), seed=0)[0])
            except Exception as exc:  # noqa: BLE001 - an unreadable cloud is reported, never fatal
                side.bad.append({"file": name, "reason": reason(exc)})
    if not clouds:
        raise ValueError(f"no readable cloud in {source.uri} ({len(side.bad)} files did not decode)")
    n = min(cfg.points, *(len(c) for c in clouds))
    side.samples = len(clouds)
    return side, np.stack([c if len(c) == n else c[np.sort(np.random.default_rng(i).choice(len(c), n, replace=False))]
                           for i, c in enumerate(clouds)]).astype(np.float32)


def kl_result(cfg: EvaluateConfig, models: Models, fake: Side) -> dict:
    """KL between the classifier's predictions on each generated clip and on the real clip of the same relative file
    name (the pairing AudioLDM's evaluation uses)."""
    import numpy as np

    from models.audio_metrics import kl_divergence

    real_source = open_source(cfg.real, "audio", cfg.limit)
    real = score_audio(real_source, models, {"kl"}, cfg.batch_size)
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
    """Write the samples into OUT/samples with jobs.generate's Ray Data job (its ``--prompt-file`` path: an actor pool
    of samplers, one GPU each, ``--set generation.ray.actors=8`` for eight), skipping those already there, so a
    stopped run resumes where it was. Prompts and class indices alike: a class-conditional model reads its prompt as a
    class index, and every row carries its own index and seed, so the file names do not depend on what was skipped."""
    from jobs.generate import output_fs, run_ray

    gen = generation_config(cfg)
    rows = generation_rows(cfg)
    fs, root = output_fs(gen.out)
    existing = {p.rsplit("/", 1)[-1] for p in fs.find(root)}
    todo = pending(rows, existing)
    log.info("generate: %d samples, %d already written", len(rows), len(rows) - len(todo))
    if todo:
        run_ray(gen, todo)
    return {"model": cfg.model, "samples": len(rows), "skipped": len(rows) - len(todo), "out": gen.out}


def _base_from_metadata(model: str | None) -> EvaluateConfig | None:
    """Generate and score: the model folder's sampler defaults under every other source, as in jobs.generate."""
    from jobs.generate import _base_from_metadata as generate_base

    base = generate_base(model)
    return EvaluateConfig(generation=base) if base is not None else None


# ------------------------------------------------------------------------------------------------------------- report


# --------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.evaluate", __doc__.split("\n\n")[0], EvaluateConfig,
                         set_example="kid.subset_size=500")
    parser.add_argument("--real", help="real set: folder (local or s3://), jobs.prepare output or .npz image batch")
    parser.add_argument("--fake", help="generated set: folder, jobs.prepare output or .npz image batch")
    parser.add_argument("--real-stats", help="real statistics .npz: this job's cache file or an ADM reference batch")
    parser.add_argument("--metric", help="comma-separated: "
                                         f"{', '.join(IMAGE_METRICS + AUDIO_METRICS + POINT_METRICS)}")
    parser.add_argument("--feature-extractor", help="FID Inception weights file, or a transformers vision folder "
                                                    "(CLIP, DINOv2) for FD / KID")
    parser.add_argument("--clip-model", help="transformers CLIPModel folder (clip_score)")
    parser.add_argument("--audio-model", help="ClapModel or audio-encoder folder, or VGGish / PANNs CNN14 weights "
                                              "file (fad)")
    parser.add_argument("--clap-model", help="ClapModel folder (clap_score)")
    parser.add_argument("--classifier", help="transformers audio classifier folder, or PANNs CNN14 weights file (kl)")
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
