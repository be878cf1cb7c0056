"""Resolution, duration and point-count buckets (docs/official-formats.md#buckets;
docs/design-decisions.md#deterministic-buckets).

Image buckets are every (h_p·16, w_p·16) pixel size with h_p·w_p ≤ max_patches and aspect ≤ max_aspect, enumerated like
the official ``imgproc.py`` (for each width the largest height that fits). Unlike the official random top-4 choice, an
image goes to its best-fit bucket deterministically — the fit ratio min(sw, sh) / max(sw, sh) of the two scale factors —
so a rerun puts every sample in the same bucket (resume needs that). Every bucket has its own micro-batch size so that
batches carry about the same number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from models.config_io import from_dict
from models.geometry import DEFAULT_PATCH_SIZE, image_size, token_grid
from models.mel import MelConfig, frames_for
from pipelines import constants as C
from pipelines.config import PrepareConfig, mel_config
from pipelines.stage import Reject, Stage, meta_of


@dataclass(frozen=True)
class Bucket:
    """One bucket: its directory name, the shape of its samples' tensor, and its micro-batch size."""

    modality: str
    name: str
    size: tuple[int, ...]  # image (H, W) pixels; audio (samples,); points (count,)
    micro_batch: int


# ---- images ------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def image_bucket_sizes(max_patches: int, max_aspect: float,
                       patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[tuple[int, int], ...]:
    """(H, W) pixel sizes of every image bucket, by decreasing width (official enumeration order). ``max_patches``
    counts tokens (``models.geometry``: a token is ``patch_size`` latent cells, 16 pixels at patch 2, per side)."""
    sizes = []
    for w_p in range(max_patches, 0, -1):
        h_p = max_patches // w_p
        # the largest height that fits the budget, lowered to respect the aspect limit in the tall direction
        h_p = min(h_p, math.floor(w_p * max_aspect))
        if h_p < 1 or w_p / h_p > max_aspect:
            continue
        sizes.append(image_size(h_p, w_p, patch_size))
    return tuple(sizes)


def image_micro_batch(size: tuple[int, int], batch_tokens: int, patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    rows, columns = token_grid(size[0], size[1], patch_size)
    return max(1, batch_tokens // (rows * columns))


def image_bucket_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"  # H x W in pixels


def best_image_bucket(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket keeping most of the image: max over buckets of min(sw, sh) / max(sw, sh), sw = W_b / w, sh = H_b / h.

    Ties go to the larger bucket, then the wider one, so the choice is a pure function of (width, height).
    """
    best, best_key = sizes[0], None
    for h_b, w_b in sizes:
        sw, sh = w_b / width, h_b / height
        key = (min(sw, sh) / max(sw, sh), h_b * w_b, w_b)
        if best_key is None or key > best_key:
            best, best_key = (h_b, w_b), key
    return best


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the smallest aspect-preserving resize that covers the bucket (then centre-cropped to it)."""
    h_b, w_b = bucket
    scale = max(w_b / width, h_b / height)
    return max(w_b, round(width * scale)), max(h_b, round(height * scale))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket and centre-crop, in one bicubic pass over the cropped region only.

    Same result as resizing the whole image to its cover size and cropping (the filter reads source pixels beyond the
    box edges just the same), but only the bucket's pixels are computed. ``reducing_gap``: PIL first box-reduces by an
    integer factor while the source is ≥ 2× the target (official recipe), which keeps big downscales cheap.
    """
    w, h = img.size
    h_b, w_b = bucket
    if (w, h) == (w_b, h_b):
        return img
    cw, ch = cover_size(w, h, bucket)
    left, top = (cw - w_b) // 2, (ch - h_b) // 2
    sx, sy = w / cw, h / ch  # cover pixels → source pixels
    box = (left * sx, top * sy, (left + w_b) * sx, (top + h_b) * sy)
    return img.resize((w_b, h_b), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)


def resize_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 → bucket-sized HxWx3 uint8 (``fit_to_bucket``)."""
    if image.shape[:2] == tuple(bucket):
        return image
    return np.asarray(fit_to_bucket(Image.fromarray(image), bucket))


# ---- audio and points ---------------------------------------------------------------------------------------------------
def audio_bucket_name(duration_s: float) -> str:
    return f"{duration_s:g}s"


def best_audio_duration(duration_s: float, durations: list[float], pad_to_s: float | None = None) -> float | None:
    """The bucket duration of a clip: ``pad_to_s`` when the clip is shorter (it is padded up to it), else the longest
    bucket duration the clip fills (it is centre-cropped to it: a clip longer than every bucket goes to the longest);
    None if it is shorter than every bucket and nothing pads it."""
    if pad_to_s is not None and duration_s < pad_to_s - 1e-9:
        return pad_to_s
    fitting = [d for d in sorted(durations) if d <= duration_s + 1e-9]
    return fitting[-1] if fitting else None


def points_bucket_name(count: int) -> str:
    return f"{count}pts"


def best_point_count(count: int, counts: list[int]) -> int | None:
    fitting = [c for c in sorted(counts) if c <= count]
    return fitting[-1] if fitting else None


def mel_frames(num_samples: int, mel: MelConfig | None = None) -> int:
    """Log-mel frames of a clip (centred frames every hop: ``models.mel.frames_for``; default ``MelConfig()``)."""
    return frames_for(num_samples, mel or MelConfig())


def micro_batch_for(modality: str, size: tuple, config: PrepareConfig) -> int:
    """The micro-batch size of a bucket from its size (the ``BUCKET_SIZE`` column: image (H, W) pixels, audio
    (seconds,), points (count,)): about the same tokens, seconds or points in every bucket's batches."""
    b = config.bucket
    if modality == C.IMAGE:
        return image_micro_batch(size, b.image.batch_tokens)
    if modality == C.AUDIO:
        return max(1, int(b.audio_batch_seconds // size[0]))
    return max(1, b.point_batch_points // size[0])


def bucket_size(row: dict) -> tuple:
    """The row's ``BUCKET_SIZE`` as a tuple of Python numbers (between operators it is a numpy row)."""
    return tuple(np.asarray(row[C.BUCKET_SIZE]).tolist())


def bucket_table(config, mel: MelConfig | None = None) -> list[Bucket]:
    """Every bucket the config allows, for --dry-run, docs and the trainer's sampler; audio sizes in samples at the
    run's mel sample rate (``encode.run_mel``: the mel VAE's with ``encode.audio_vae``; default ``MelConfig()``)."""
    mel = mel or MelConfig()
    table = []
    img = config.bucket.image
    for size in image_bucket_sizes(img.max_patches, img.max_aspect):
        table.append(Bucket(C.IMAGE, image_bucket_name(size), size, micro_batch_for(C.IMAGE, size, config)))
    for d in sorted(config.bucket.audio_durations_s):
        mb = micro_batch_for(C.AUDIO, (d,), config)
        table.append(Bucket(C.AUDIO, audio_bucket_name(d), (round(d * mel.sample_rate),), mb))
    for n in sorted(config.bucket.point_counts):
        table.append(Bucket(C.POINTS, points_bucket_name(n), (n,), micro_batch_for(C.POINTS, (n,), config)))
    return table


# ---- the stage ---------------------------------------------------------------------------------------------------------
class Bucketize(Stage):
    """Assign each sample its bucket (name in ``BUCKET``, numbers in ``BUCKET_SIZE``) and bring its payload to the
    bucket's size: images keep the bucket the decode stage chose and decoded them to (``decode.decode_to_bucket``),
    audio is centre-cropped to the bucket duration (``best_audio_duration``) or, shorter than
    ``bucket.audio_pad_to_s``, padded with silence on the right up to it — its json records the crop start and the
    padding in seconds —, points subsampled (seeded by key, so reruns agree)."""

    stage = C.STAGE_BUCKET

    def __init__(self, config: dict, mel: dict | None = None):
        self.config = from_dict(PrepareConfig, config)
        self.sample_rate = mel_config(mel).sample_rate  # of the decoded audio (encode.run_mel)

    def process_row(self, row: dict) -> dict:
        modality, payload, meta = row[C.MODALITY], row[C.PAYLOAD], meta_of(row)
        if modality == C.IMAGE:
            size = bucket_size(row)
            row[C.PAYLOAD] = resize_to_bucket(payload, size)  # a no-op: decoded at this size
            row[C.BUCKET] = image_bucket_name(size)
        elif modality == C.AUDIO:
            rate, b = self.sample_rate, self.config.bucket
            duration = best_audio_duration(len(payload) / rate, b.audio_durations_s, b.audio_pad_to_s)
            if duration is None:
                raise Reject(C.Reason.NO_BUCKET, f"{len(payload) / rate:.2f}s is shorter than every bucket "
                                                 f"{sorted(b.audio_durations_s)} (bucket.audio_pad_to_s pads)")
            n = round(duration * rate)
            start = max(0, (len(payload) - n) // 2)  # centre crop: keeps the middle of the clip
            clip = np.asarray(payload[start:start + n], dtype=np.float32)
            pad = n - len(clip)  # silence after a clip shorter than its (padded-to) bucket
            row[C.PAYLOAD] = np.ascontiguousarray(np.pad(clip, (0, pad)) if pad else clip)
            row[C.BUCKET], row[C.BUCKET_SIZE] = audio_bucket_name(duration), (duration,)
            meta[C.CROP_START] = round(start / rate, 4)
            meta[C.PAD] = round(pad / rate, 4)
        else:
            count = best_point_count(len(payload), self.config.bucket.point_counts)
            if count is None:
                raise Reject(C.Reason.NO_BUCKET, f"{len(payload)} points is fewer than every bucket")
            if count < len(payload):
                rng = np.random.default_rng(int(row[C.KEY], 16) % (2**32))
                payload = payload[np.sort(rng.choice(len(payload), count, replace=False))]
            row[C.PAYLOAD] = np.ascontiguousarray(payload, dtype=np.float32)
            row[C.BUCKET], row[C.BUCKET_SIZE] = points_bucket_name(count), (count,)
        meta["bucket"] = row[C.BUCKET]
        return row

