"""Decode and validate (issue "Stages: decode and validate").

- images: format, mode, decompression-bomb limit (checked on the header, before any pixel is decoded), truncation;
  decoded straight to the sample's bucket (JPEG draft decoding at 1/2..1/8 scale, box reduction, one bicubic pass over
  the centre crop only), so a 6000-px photo never travels through the pipeline at full size and every later stage —
  models included — sees exactly the pixels that are trained on;
- audio: any libsndfile format (wav/flac/mp3/ogg), NaN/inf, mixed to mono, resampled to the run's mel sample rate
  (16 kHz, or the mel VAE's: ``encode.run_mel``), duration, silence;
- 3D: ply/obj/off meshes through trimesh with area-weighted surface sampling of N points, npy/npz point clouds; empty and
  degenerate shapes rejected; normalised to the unit sphere.

The per-sample functions raise ``Reject(reason, message)``; the stage classes wrap them for Ray Data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image

from models.config_io import from_dict
from models.storage import filesystem
from pipelines import constants as C
from pipelines.buckets import best_image_bucket, cover_size, fit_to_bucket, image_bucket_sizes
from pipelines.config import PrepareConfig, mel_config
from pipelines.io import options_for, read_range
from pipelines.sources import CAPTION_COLUMNS, extension, split_source
from pipelines.stage import Reject, Stage, meta_of

R = C.Reason


# ---- images ------------------------------------------------------------------------------------------------------------
def decode_to_bucket(data: bytes, cfg, bucket_sizes: tuple[tuple[int, int], ...]
                     ) -> tuple[Image.Image, tuple[int, int], dict[str, Any]]:
    """Encoded bytes → (RGB PIL image at the size of its best-fit bucket, that bucket's (H, W), info). Raises Reject.

    The one place an image's bucket is chosen (``buckets.best_image_bucket``): the bucket stage keeps it."""
    if not data:
        raise Reject(R.EMPTY_FILE, "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Reject(R.TOO_MANY_PIXELS, str(exc)) from exc
        except Exception as exc:  # PIL.UnidentifiedImageError and friends
            raise Reject(R.NOT_DECODABLE, f"{type(exc).__name__}: {exc}") from exc
    width, height = img.size
    info = {"width": width, "height": height, "format": img.format, "mode": img.mode}
    if img.format not in cfg.formats:
        raise Reject(R.BAD_FORMAT, f"format {img.format} not in {cfg.formats}")
    if width * height > cfg.max_pixels:
        raise Reject(R.TOO_MANY_PIXELS, f"{width}x{height} exceeds {cfg.max_pixels} pixels")
    if img.mode not in cfg.modes:
        raise Reject(R.BAD_MODE, f"mode {img.mode}")
    if width < 1 or height < 1:
        raise Reject(R.EMPTY_FILE, f"{width}x{height}")
    # JPEG draft decodes at 1/2..1/8 scale in the DCT domain (never below the requested size, here the bucket's cover
    # size): most of the speed of a curation job, since the full-size pixels are never produced.
    bucket = best_image_bucket(width, height, bucket_sizes)
    cw, ch = cover_size(width, height, bucket)
    if img.format == "JPEG":
        img.draft("RGB", (cw, ch))
    try:
        img.load()
    except Exception as exc:
        reason = R.TRUNCATED if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else R.NOT_DECODABLE
        raise Reject(reason, f"{type(exc).__name__}: {exc}") from exc
    # greyscale stays one band through the resampling and becomes RGB at the bucket's size: the same pixels (L → RGB
    # copies the band, and every band is resampled alike) for a third of the work
    img = img if img.mode == "L" else to_rgb(img)
    factor = min(img.size[0] // cw, img.size[1] // ch)
    if factor >= 2:
        img = img.reduce(factor)  # box filter, exact for integer factors
    return to_rgb(fit_to_bucket(img, bucket)), bucket, info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any accepted mode → RGB; transparency is composited on white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr / peak * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def dhash(image: np.ndarray | Image.Image) -> int:
    """64-bit difference hash as a signed int64: neighbouring-pixel gradients of a 9x8 grayscale thumbnail."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= (1 << 63) else value


# ---- audio -------------------------------------------------------------------------------------------------------------
def decode_audio(data: bytes, cfg, sample_rate: int = C.SAMPLE_RATE) -> tuple[np.ndarray, dict[str, Any]]:
    """Encoded bytes → (float32 mono waveform at ``sample_rate``, info). Raises Reject."""
    import soundfile as sf

    if not data:
        raise Reject(R.EMPTY_FILE, "zero bytes")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise Reject(R.NOT_DECODABLE, f"{type(exc).__name__}: {exc}") from exc
    info = {"sample_rate": int(rate), "channels": int(wave.shape[1]), "duration_s": wave.shape[0] / rate}
    if wave.shape[0] == 0:
        raise Reject(R.EMPTY_FILE, "no audio frames")
    if not np.isfinite(wave).all():
        raise Reject(R.NAN, "NaN or inf samples")
    if info["duration_s"] > cfg.max_duration_s:
        raise Reject(R.TOO_LONG, f"{info['duration_s']:.1f}s > {cfg.max_duration_s}s")
    mono = wave.mean(axis=1)
    if rate != sample_rate:
        import torch
        import torchaudio.functional as AF

        mono = AF.resample(torch.from_numpy(mono), int(rate), int(sample_rate)).numpy()
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    info["rms_db"] = round(level, 2) if math.isfinite(level) else None
    if level < cfg.silence_db:
        raise Reject(R.SILENT, f"RMS {level:.1f} dBFS < {cfg.silence_db}")
    return mono.astype(np.float32), info


# ---- 3D ----------------------------------------------------------------------------------------------------------------
def decode_points(data: bytes, ext: str, cfg, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Mesh or point-cloud bytes → ((N,3) float32 points on the unit sphere, info). Raises Reject."""
    if not data:
        raise Reject(R.EMPTY_FILE, "zero bytes")
    rng = np.random.default_rng(seed)
    if ext in ("npy", "npz"):
        points = load_point_array(data, ext)
        info = {"kind": "points", "input_points": int(len(points))}
    else:
        vertices, faces = load_mesh(data, ext)
        info = {"kind": "mesh" if len(faces) else "points", "vertices": int(len(vertices)), "faces": int(len(faces))}
        if len(vertices) == 0:
            raise Reject(R.EMPTY_SHAPE, "no vertices")
        if not np.isfinite(vertices).all():
            raise Reject(R.NAN, "NaN or inf vertices")
        points = sample_surface(vertices, faces, cfg.num_points, rng, cfg.min_extent) if len(faces) else vertices
    if len(points) == 0:
        raise Reject(R.EMPTY_SHAPE, "no points")
    if not np.isfinite(points).all():
        raise Reject(R.NAN, "NaN or inf coordinates")
    check_not_degenerate(points, cfg.min_extent)
    return normalise_unit_sphere(points), info


def load_point_array(data: bytes, ext: str) -> np.ndarray:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise Reject(R.NOT_DECODABLE, f"{type(exc).__name__}: {exc}") from exc
    if ext == "npz":
        names = list(loaded.keys())
        name = next((n for n in ("points", "xyz", "pos", "coords") if n in names), names[0] if names else None)
        if name is None:
            raise Reject(R.EMPTY_SHAPE, "empty npz")
        loaded = loaded[name]
    arr = np.asarray(loaded)
    if arr.ndim != 2 or arr.shape[1] < 3:
        if arr.size == 0:
            raise Reject(R.EMPTY_SHAPE, f"shape {arr.shape}")
        raise Reject(R.NOT_DECODABLE, f"expected (N, >=3) points, got shape {arr.shape}")
    return arr[:, :3].astype(np.float64)


def load_mesh(data: bytes, ext: str) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    try:
        loaded = trimesh.load(io.BytesIO(data), file_type=ext, process=False, force="mesh")
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        # trimesh reports an empty scene when a file has no geometry at all
        if "empty" in message.lower() or "no geometry" in message.lower():
            raise Reject(R.EMPTY_SHAPE, message) from exc
        raise Reject(R.NOT_DECODABLE, message) from exc
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise Reject(R.NOT_DECODABLE, "face index out of range")
    return vertices, faces


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator,
                   min_extent: float) -> np.ndarray:
    """N points uniformly on the surface: faces drawn with probability ∝ area, barycentric (√u) sampling inside."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = areas.sum()
    if not np.isfinite(total) or total <= min_extent**2:
        raise Reject(R.DEGENERATE, f"surface area {total:.3g}")
    idx = rng.choice(len(faces), size=n, p=areas / total)
    u = np.sqrt(rng.random(n))[:, None]
    v = rng.random(n)[:, None]
    return (1 - u) * a[idx] + u * (1 - v) * b[idx] + u * v * c[idx]


def check_not_degenerate(points: np.ndarray, min_extent: float) -> None:
    """Points spanning (almost) nothing or lying on one line describe no shape."""
    centred = points - points.mean(axis=0)
    extent = float(np.abs(centred).max()) if len(points) else 0.0
    if extent < min_extent:
        raise Reject(R.DEGENERATE, f"extent {extent:.3g}")
    singular = np.linalg.svd(centred[:: max(1, len(centred) // 4096)], compute_uv=False)
    if len(singular) < 2 or singular[1] <= 1e-6 * singular[0]:
        raise Reject(R.DEGENERATE, "all points on one line")


def normalise_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding-box centre, scale so the farthest point lies on the unit sphere."""
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    centred = points - centre
    radius = float(np.linalg.norm(centred, axis=1).max())
    return (centred / radius).astype(np.float32)


# ---- the stage ---------------------------------------------------------------------------------------------------------
class Decode(Stage):
    """Fetch, decode and validate one modality; reads sidecar captions; records hashes for dedup.

    In: item rows (sources.ITEM_SCHEMA). Out: key, source, modality, caption, caption_source, meta, payload, sha256,
    phash, data (the original bytes when ``write.keep_original``, or when they can be stored as they are — see
    ``write.skip_reencode``; else empty); images also bucket_size, the (H, W) of the bucket they were decoded to.
    """

    stage = C.STAGE_DECODE

    def __init__(self, config: dict, modality: str, s3_options: dict, mel: dict | None = None):
        self.config = from_dict(PrepareConfig, config)
        self.modality = modality
        self.s3_options = s3_options
        self.sample_rate = mel_config(mel).sample_rate  # audio: the run's log-mel parameters (encode.run_mel)
        b = self.config.bucket.image
        self.bucket_sizes = image_bucket_sizes(b.max_patches, b.max_aspect)
        w, e = self.config.write, self.config.encode
        # the image member's file format when one is written (no VAE) and sources may be stored as they are
        self.passthrough = w.image_format if w.skip_reencode and not (e.enabled and e.vae) else None

    def fetch(self, url: str, offset: int, length: int) -> bytes:
        try:
            fs, path = filesystem(url, options_for(url, self.s3_options))
            return read_range(fs, path, offset, length)
        except Exception as exc:
            raise Reject(R.UNREADABLE, f"{type(exc).__name__}: {exc}") from exc

    def read_sidecar(self, url: str) -> tuple[str, dict]:
        """Caption and metadata of a sidecar ``.txt`` / ``.json`` (a broken sidecar only loses the caption)."""
        try:
            text = self.fetch(url, -1, -1).decode("utf-8", "replace")
        except Reject:
            return "", {}
        if url.endswith(".json"):
            try:
                meta = json.loads(text)
            except ValueError:
                return "", {}
            if not isinstance(meta, dict):
                return "", {}
            caption = next((str(meta.pop(c)) for c in CAPTION_COLUMNS if meta.get(c)), "")
            return caption, meta
        return text.strip(), {}

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = meta_of(row)
        read = self.config.read
        if read.label_from != "none" and C.LABEL not in meta:  # before its bytes are fetched (pipelines.labels)
            missing = "no folder names it" if read.label_from == "folder" else f"it has no {read.label_column!r} value"
            raise Reject(R.NO_LABEL, f"read.label_from={read.label_from}, and {missing}")
        url, member = split_source(str(row[C.SOURCE]))
        data = self.fetch(url, int(row[C.OFFSET]), int(row[C.LENGTH]))
        caption, caption_source = str(row[C.CAPTION] or ""), str(row[C.CAPTION_SOURCE] or "")
        if row[C.CAPTION_URI]:
            sidecar_caption, sidecar_meta = self.read_sidecar(str(row[C.CAPTION_URI]))
            meta = {**sidecar_meta, **meta}
            caption = caption or sidecar_caption
            caption_source = C.CAPTION_FROM_SIDECAR if caption else ""
        key = str(row[C.KEY])
        phash, keep, bucket = 0, self.config.write.keep_original, None
        if self.modality == C.IMAGE:
            img, bucket, info = decode_to_bucket(data, self.config.decode.image, self.bucket_sizes)
            phash = dhash(img)
            payload = np.asarray(img)
            keep = keep or (self.passthrough is not None and stored_as_is(info, payload.shape, self.passthrough))
        elif self.modality == C.AUDIO:
            payload, info = decode_audio(data, self.config.decode.audio, self.sample_rate)
        else:
            seed = int(key, 16) % (2**32)  # same key → same samples on every rerun
            payload, info = decode_points(data, extension(member or url), self.config.decode.points, seed)
        meta.update(info)
        meta["ext"] = extension(member or url)
        out = {C.KEY: key, C.SOURCE: str(row[C.SOURCE]), C.MODALITY: self.modality, C.CAPTION: caption,
               C.CAPTION_SOURCE: caption_source, C.META: meta,
               C.PAYLOAD: payload, C.SHA256: hashlib.sha256(data).hexdigest(), C.PHASH: np.int64(phash),
               C.DATA: data if keep else b""}
        if bucket is not None:
            out[C.BUCKET_SIZE] = bucket  # decoded to it: the bucket stage keeps it
        return out


PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def stored_as_is(info: dict[str, Any], shape: tuple[int, ...], image_format: str) -> bool:
    """True when the source file already is the image member to write: an RGB ``image_format`` file whose pixels are
    exactly the bucket-sized payload (no draft, reduce, resize or crop happened)."""
    return (info.get("format") == PIL_FORMATS.get(image_format) and info.get("mode") == "RGB"
            and (info.get("height"), info.get("width")) == tuple(shape[:2]))
