"""PrepareConfig: the typed config tree of ``python -m jobs.prepare`` (defaults ← YAML ← ``--set``).

Model stages run only when their model path is set (issue "Ray Data curation"): ``caption.model``,
``caption.audio_model``, ``filter.clip_model``, ``filter.aesthetic_model``, ``filter.clap_model``, ``encode.vae``,
``encode.audio_vae``, ``encode.text_encoder``. Every stage has its own ``resources`` so encoders can land on other
hardware than decoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.config_io import ConfigError, from_dict
from models.mel import MelConfig
from models.presets import OFFICIAL_MAX_ASPECT
from pipelines import constants as C


@dataclass
class Resources:
    """Ray resources of one stage, applied at its ``map_batches`` call site.

    ``concurrency``: actor-pool size for model stages (with ``max_concurrency``: its starting and smallest size); for
    CPU task stages 0 means "as many tasks as Ray schedules".
    Actor pools default to 0.5 CPU so that a 2-core machine never hands every CPU to actors
    (docs/architecture.md#stack-pitfalls).
    ``max_concurrency``: model stages only (actor pools). Above ``concurrency``, the pool starts with ``concurrency``
    actors and Ray Data grows it up to ``max_concurrency`` while batches queue up for it — on a cluster as fast as the
    autoscaler adds nodes with the stage's resources (docs/curation.md#stages-pipelines-in-pipeline-order).
    0: a fixed pool of ``concurrency`` actors.
    ``custom``: Ray custom resources (``resources=`` of the operator), e.g. ``{"encode_gpu": 1}`` so that the stage
    runs only on — and makes the autoscaler start — nodes that advertise that resource. Set one with
    ``--set encode.vae_resources.custom.encode_gpu=1``.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    custom: dict[str, float] = field(default_factory=dict)
    concurrency: int = 0
    max_concurrency: int = 0
    # rows per batch; for the task stages also per task. 128: a task of a few hundred milliseconds, so a job spends
    # less on Ray Data's per-task handling and the run's actors' per-batch calls (about 5% of a 2000-image job at 32;
    # docs/benchmarks.md#curation). Model stages set their own (``_actor_resources``).
    batch_size: int = 128


def _actor_resources(batch_size: int = 8) -> Resources:
    return Resources(num_cpus=0.5, concurrency=1, batch_size=batch_size)


# The config keys of every stage's resources, and whether they run model stages in actor pools (True) or model-free
# stages in tasks (False): what build_plan gives each StageSpec (tests/test_pipelines_units.py checks that they agree).
STAGE_RESOURCES = {"decode.resources": False, "caption.resources": True, "filter.resources": True,
                   "encode.vae_resources": True, "encode.audio_vae_resources": True, "encode.text_resources": True,
                   "write.resources": False}


@dataclass
class StorageConfig:
    """S3 settings; each one left empty falls back to AWS_ENDPOINT_URL / AWS_REGION / AWS_ACCESS_KEY_ID / ..."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


@dataclass
class ReadConfig:
    modalities: list[str] = field(default_factory=lambda: list(C.MODALITIES))
    limit: int = 0  # 0 = every input; else the first N items (handy for trials)
    # class labels (docs/curation.md#class-labels): "folder" (the name of the folder that holds the file, as
    # torchvision's ImageFolder), "column" (a list file's / a tar json's label_column), "none"
    label_from: str = "none"
    label_column: str = "label"


@dataclass
class ImageDecodeConfig:
    formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])  # PIL format names accepted
    max_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default); checked on the header, before decoding
    modes: list[str] = field(default_factory=lambda: ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I"])


@dataclass
class AudioDecodeConfig:
    max_duration_s: float = 3600.0  # a decode guard; the length rules live in filter
    silence_db: float = -60.0  # RMS below this (dBFS) is silence


@dataclass
class PointsDecodeConfig:
    num_points: int = 4096  # area-weighted surface samples drawn from a mesh
    min_extent: float = 1e-6  # a shape whose points span less than this (or lie on a line) is degenerate


@dataclass
class DecodeConfig:
    image: ImageDecodeConfig = field(default_factory=ImageDecodeConfig)
    audio: AudioDecodeConfig = field(default_factory=AudioDecodeConfig)
    points: PointsDecodeConfig = field(default_factory=PointsDecodeConfig)
    resources: Resources = field(default_factory=Resources)


@dataclass
class CaptionConfig:
    enabled: bool = True
    model: str | None = None  # image-to-text / vision-language model folder (transformers); also captions 3D renders
    audio_model: str | None = None  # speech/audio-to-text model folder (transformers)
    prompt: str | None = None  # for vision-language models that take a text prompt
    recaption: bool = False  # False: keep existing captions, caption only the rest
    max_new_tokens: int = 40
    views: int = 4  # 3D objects are captioned from this many rendered views tiled into one image
    view_size: int = 128
    require_caption: bool = False  # reject samples that end with no caption
    resources: Resources = field(default_factory=_actor_resources)


@dataclass
class FilterConfig:
    enabled: bool = True
    # rules
    min_image_side: int = 32
    max_image_aspect: float = OFFICIAL_MAX_ASPECT
    min_duration_s: float = 1.0
    max_duration_s: float = 600.0
    min_points: int = 256
    # dedup (exact: sha256 of the file; perceptual: 64-bit dHash of images within phash_max_distance bits)
    dedup_exact: bool = True
    dedup_perceptual: bool = True
    phash_max_distance: int = 0
    # model scores (each runs when its model is set; a threshold of None only records the score)
    clip_model: str | None = None
    min_clip_score: float | None = None
    aesthetic_model: str | None = None  # an MLP head file (.safetensors/.pth) on CLIP image embeddings; needs clip_model
    min_aesthetic: float | None = None
    clap_model: str | None = None
    min_clap_score: float | None = None
    resources: Resources = field(default_factory=_actor_resources)


@dataclass
class ImageBucketConfig:
    max_patches: int = 4096  # token budget in 16-px patches: 4096 = 1024²
    max_aspect: float = OFFICIAL_MAX_ASPECT  # the official 4:1 crops
    batch_tokens: int = 16384  # micro-batch size per bucket = max(1, batch_tokens // tokens)


@dataclass
class BucketConfig:
    image: ImageBucketConfig = field(default_factory=ImageBucketConfig)
    # a clip goes to the longest of these it fills, centre-cropped to it (a clip longer than every one: the longest)
    audio_durations_s: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0, 30.0])
    # one of audio_durations_s: a clip shorter than it is padded with silence (on the right) up to it instead of being
    # cropped to a shorter bucket or rejected (no_bucket); None: never pad. The paper pads audio to 10 s.
    audio_pad_to_s: float | None = None
    audio_batch_seconds: float = 320.0
    # the paper trains its point models on 256 points (§5.3) and samples any density: one bucket by default
    point_counts: list[int] = field(default_factory=lambda: [256])
    point_batch_points: int = 65536


@dataclass
class EncodeConfig:
    enabled: bool = True
    vae: str | None = None  # diffusers AutoencoderKL folder; without it the bucket-sized image is stored
    # mel VAE folder (models.audio_vae, local or s3://): audio becomes its latents, computed from its own log-mel
    # parameters (also the decode sample rate and the buckets' frame counts); without it audio is stored as log-mel
    audio_vae: str | None = None
    vae_scaling_factor: float | None = None
    vae_shift_factor: float | None = None
    latent_mode: str = "sample"  # "sample" (official training) or "mean" of the posterior; image and audio latents
    latent_dtype: str = "float16"  # image and audio latents
    # the image VAE's compute dtype: bfloat16 on a GPU encodes several times the images per second of float32
    # (python -m jobs.bench encode; docs/benchmarks.md#vae-encode); float16 overflows in the SDXL VAE
    vae_dtype: str = "float32"
    # precomputed caption features with models.text_encoder.TextEncoder (what the trainer and sampler use online)
    text_encoder: str | None = None  # transformers model folder, or a stack folder (models.text_encoder)
    # "auto" (config.json's model_type; a stack folder by its text_encoders.json), "decoder" (Gemma, Qwen, any
    # AutoModel), "t5", "clap" or "stack"
    text_encoder_kind: str = "auto"
    text_max_length: int | None = None  # None: 256 (models.text_encoder.MAX_LENGTH); a stack's parts carry their own
    text_hidden_layer: int | None = None  # None: the kind's default (-2 for decoders: Lumina-Next's Gemma layer)
    text_dtype: str = "float16"
    vae_resources: Resources = field(default_factory=_actor_resources)
    audio_vae_resources: Resources = field(default_factory=_actor_resources)
    text_resources: Resources = field(default_factory=_actor_resources)


# the CPUs whose samples one writer actor takes (write.num_writers=0): measured, 16 CPUs make about 5600 256-px samples
# (110 MB) a second, which one writer appends to local files for about a fifth of a CPU (docs/curation.md#cpu-cost)
CPUS_PER_WRITER = 16


@dataclass
class WriteConfig:
    samples_per_shard: int = 1000
    image_format: str = "jpg"  # when there is no VAE (or with keep_original): jpg / png / webp
    jpeg_quality: int = 95
    # store a source file as it is when it already is an RGB image of its bucket's size in image_format (no decode →
    # encode round trip that would only lose quality; img2dataset's --skip_reencode)
    skip_reencode: bool = True
    keep_original: bool = False  # also store the original media bytes (jpg/png/flac...)
    # writer actors; a bucket always belongs to one of them. 0: one per CPUS_PER_WRITER CPUs of the cluster when the
    # job starts (docs/curation.md#cpu-cost); set it for a cluster that starts small and grows
    num_writers: int = 0
    rejects_flush_rows: int = 1000
    resources: Resources = field(default_factory=Resources)

    def writers(self, cluster_cpus: float) -> int:
        """``num_writers``, or when it is 0 one writer per ``CPUS_PER_WRITER`` CPUs of the cluster (at least one)."""
        return self.num_writers or max(1, math.ceil(cluster_cpus / CPUS_PER_WRITER))


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    output: str = ""
    storage: StorageConfig = field(default_factory=StorageConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    bucket: BucketConfig = field(default_factory=BucketConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    progress: bool = True

    def validate(self) -> "PrepareConfig":
        """Value checks that types alone cannot express; raises ConfigError before any work starts."""
        if not self.inputs:
            raise ConfigError("at least one --input is required")
        if not self.output:
            raise ConfigError("--output is required")
        for m in self.read.modalities:
            if m not in C.MODALITIES:
                raise ConfigError(f"read.modalities: {m!r} is not one of {list(C.MODALITIES)}")
        if self.read.label_from not in C.LABEL_SOURCES:
            raise ConfigError(f"read.label_from must be one of {list(C.LABEL_SOURCES)}, got {self.read.label_from!r}")
        if self.write.samples_per_shard < 1:
            raise ConfigError("write.samples_per_shard must be >= 1")
        if self.write.num_writers < 0:
            raise ConfigError("write.num_writers must be >= 1, or 0 for one per CPUS_PER_WRITER CPUs of the cluster")
        if self.write.image_format not in C.IMAGE_FORMATS:
            raise ConfigError(f"write.image_format must be one of {list(C.IMAGE_FORMATS)}")
        if self.encode.latent_mode not in ("sample", "mean"):
            raise ConfigError("encode.latent_mode must be 'sample' or 'mean'")
        if self.encode.vae_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("encode.vae_dtype must be float32, bfloat16 or float16")
        for name in ("latent_dtype", "text_dtype"):
            if getattr(self.encode, name) not in ("float16", "float32"):
                raise ConfigError(f"encode.{name} must be float16 or float32 (.npy has no bfloat16)")
        if self.encode.text_encoder:
            from models.text_encoder import TEXT_ENCODER_KINDS  # torch: only when a text encoder is configured

            if self.encode.text_encoder_kind not in TEXT_ENCODER_KINDS:
                raise ConfigError(f"encode.text_encoder_kind must be one of {list(TEXT_ENCODER_KINDS)}")
        if self.bucket.image.max_patches < 1 or self.bucket.image.max_aspect < 1:
            raise ConfigError("bucket.image.max_patches must be >= 1 and bucket.image.max_aspect >= 1")
        if not self.bucket.audio_durations_s or not self.bucket.point_counts:
            raise ConfigError("bucket.audio_durations_s and bucket.point_counts need at least one value")
        if min(self.bucket.audio_durations_s) <= 0:
            raise ConfigError(f"bucket.audio_durations_s must be > 0, got {self.bucket.audio_durations_s}")
        pad = self.bucket.audio_pad_to_s
        if pad is not None and not any(abs(pad - d) < 1e-9 for d in self.bucket.audio_durations_s):
            raise ConfigError(f"bucket.audio_pad_to_s={pad:g} must be one of bucket.audio_durations_s "
                              f"{self.bucket.audio_durations_s} (clips are padded up to that bucket)")
        if self.filter.aesthetic_model and not self.filter.clip_model:
            raise ConfigError("filter.aesthetic_model scores CLIP embeddings: set filter.clip_model too")
        if not 0 <= self.filter.phash_max_distance < 64:
            raise ConfigError("filter.phash_max_distance must be in [0, 63]")
        for key, actor in STAGE_RESOURCES.items():
            section, name = key.split(".")
            check_pool(f"{key}.max_concurrency", getattr(getattr(self, section), name), actor)
        return self


def check_pool(key: str, r: Resources, actor: bool) -> None:
    """``max_concurrency`` (``key``) of one stage's resources ``r``: a growing actor pool's upper bound."""
    if r.max_concurrency < 0:
        raise ConfigError(f"{key} must be >= 0 (0: a fixed pool of concurrency actors), got {r.max_concurrency}")
    if not r.max_concurrency:
        return
    if not actor:
        raise ConfigError(f"{key}: max_concurrency is for model stages (actor pools: caption, filter scores, encode "
                          f"models); this stage runs in Ray tasks, whose number concurrency bounds (0: as many as "
                          f"Ray schedules)")
    if r.max_concurrency < r.concurrency:
        raise ConfigError(f"{key}={r.max_concurrency} is below concurrency={r.concurrency}, the pool's starting "
                          f"(and smallest) size; set it >= concurrency, or 0 for a fixed pool")


def mel_config(mel: dict | None) -> MelConfig:
    """The log-mel parameters a stage was handed (``pipelines.encode.run_mel`` on the driver, as a dict: the audio VAE's
    with ``encode.audio_vae``), or the default ``MelConfig()``."""
    return from_dict(MelConfig, mel) if mel else MelConfig()
