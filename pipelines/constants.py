"""Every name that crosses the boundary between the curation job and its readers (trainer, tests, users), defined once.

docs/architecture.md#shards-and-manifest: shards live at ``OUTPUT/shards/{modality}/{bucket}/{NNNNNN}.tar``; a
sample is one key with an encoded tensor, ``json`` metadata, ``txt`` caption and optional extras. The trainer imports
these constants (through ``pipelines.shards``) to read the shards, so the two sides cannot drift.
"""

from __future__ import annotations

from models.mel import MelConfig

# ---- modalities ------------------------------------------------------------------------------------------------------
IMAGE = "image"
AUDIO = "audio"
POINTS = "points"
MODALITIES = (IMAGE, AUDIO, POINTS)

# File extensions (lower case, no dot) that decide an input's modality.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
POINTS_EXTENSIONS = ("ply", "obj", "off", "npy", "npz")
CAPTION_EXTENSIONS = ("txt", "json")  # sidecar captions: photo.jpg + photo.txt / photo.json
LIST_EXTENSIONS = ("parquet", "csv", "jsonl")  # lists of paths with optional captions and metadata
TAR_EXTENSIONS = ("tar",)  # existing WebDataset shards

# ---- output layout ---------------------------------------------------------------------------------------------------
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
STATS_FILE = "stats.json"
# features of the empty prompt "" (L, D) from the text encoder that wrote text.npy: caption dropout swaps them in
NULL_TEXT_FILE = "null_text.npy"
# class labels of the output (read.label_from): {"label_from", "label_column", "class_names"}; a sample's json has its
# index (LABEL) and name (LABEL_NAME), and an index never changes once written (docs/curation.md#class-labels)
LABELS_FILE = "labels.json"
LABEL = "label"
LABEL_NAME = "label_name"
LABEL_SOURCES = ("none", "folder", "column")
WORK_DIR = "_work"  # committed reject parts of every run; rebuilt into rejects.parquet at the end of a run
SHARD_DIGITS = 6  # 000000.tar
SHARD_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".json"  # 000000.json beside 000000.tar: the commit record of that shard

# ---- encoder records (manifest columns, stats.json) -------------------------------------------------------------------
# Manifest columns (nullable strings): canonical JSON (json.dumps(record, sort_keys=True)) of the encoder that wrote a
# shard's tensors — the VAE of a latent shard, the text encoder of a shard with text.npy — or null without one. The
# ``vae`` column names the VAE of the shard's own modality: the image VAE (encode.vae, VAE_RECORD_KEYS) on image
# latent shards, the mel VAE (encode.audio_vae, AUDIO_VAE_RECORD_KEYS) on audio latent shards
# (docs/curation.md#encoder-records).
MANIFEST_VAE = "vae"
MANIFEST_TEXT_ENCODER = "text_encoder"
ENCODER_COLUMNS = (MANIFEST_VAE, MANIFEST_TEXT_ENCODER)
# The run's models by their encode.* key: encoder_records(), and stats.json's "encoders" —
# {"vae": record | null, "audio_vae": record | null, "text_encoder": record | null}.
AUDIO_VAE = "audio_vae"
RUN_ENCODERS = (MANIFEST_VAE, AUDIO_VAE, MANIFEST_TEXT_ENCODER)
STATS_ENCODERS = "encoders"
# The keys of each record. path: the model reference as given (encode.vae / encode.audio_vae / encode.text_encoder: an
# s3:// URI, a local path or a hub id — never a local cache copy); layer: the hidden-states index actually used (a
# default resolved). The mel VAE's record also has its format (ours, or a diffusers mel AutoencoderKL such as
# AudioLDM's), its latent's frequency rows (latent_rows: 1 for ours, n_mels / 4 for AudioLDM's), its mel frames per
# latent frame (downsample) and its models.mel.MelConfig as a dict (mel): the features its latents were computed from.
VAE_RECORD_KEYS = ("path", "scaling_factor", "shift_factor", "latent_channels")
AUDIO_VAE_RECORD_KEYS = ("path", "format", "scaling_factor", "shift_factor", "latent_channels", "latent_rows",
                         "downsample", "mel")
TEXT_ENCODER_RECORD_KEYS = ("path", "kind", "layer", "max_length", "pad_to_multiple_of", "hidden_size")

# ---- sample members (WebDataset extensions) ----------------------------------------------------------------------------
# VAE latents in encode.latent_dtype: images (C, H/8, W/8); audio with encode.audio_vae (C, ⌈frames / downsample⌉),
# or (C, F, ⌈frames / downsample⌉) with a 2D mel VAE (AudioLDM's: F = n_mels / 4)
LATENT_MEMBER = "latent.npy"
MEL_MEMBER = "mel.npy"  # audio without a mel VAE: log-mel spectrogram (n_mels, frames), models.mel.log_mel
POINTS_MEMBER = "points.npy"  # point samples (N, 3) on the unit sphere
TEXT_FEATURES_MEMBER = "text.npy"  # optional precomputed caption features (L, D), unpadded
CAPTION_MEMBER = "txt"
META_MEMBER = "json"
IMAGE_FORMATS = ("jpg", "png", "webp")  # bucket-sized image when there is no VAE, or the original when kept
ORIGINAL_AUDIO_MEMBER = "flac"

# ---- Ray Data column names (between the stages) ----------------------------------------------------------------------
KEY = "key"  # 16 hex digits, a hash of the source URI: stable across reruns, which is what makes resume exactly-once
SOURCE = "source"  # URI of the file (``tar_uri#member`` inside a tar)
MODALITY = "modality"
OFFSET = "offset"  # byte range inside SOURCE's file; -1 = the whole file
LENGTH = "length"
CAPTION = "caption"
CAPTION_SOURCE = "caption_source"
CAPTION_URI = "caption_uri"  # sidecar caption file to read in the decode stage
META = "meta"  # JSON text: metadata carried from lists and sidecars, extended by every stage
DATA = "data"  # the original encoded bytes
PAYLOAD = "payload"  # decoded media: HxWx3 uint8 image, float32 waveform at SAMPLE_RATE, (N,3) float32 points
SHA256 = "sha256"
PHASH = "phash"  # 64-bit perceptual hash (dHash) as a signed int64, images only; 0 elsewhere
BUCKET = "bucket"
# the numbers of the bucket's name, so that no stage parses the name: image (H, W) pixels, audio (seconds,),
# points (count,); set by the decode stage for images (decoded straight to their bucket), by the bucket stage otherwise
BUCKET_SIZE = "bucket_size"
TENSOR = "tensor"  # the encoded tensor that goes into the sample's tensor member
TEXT_FEATURES = "text_features"

# Caption sources recorded in every sample's json.
CAPTION_FROM_SIDECAR = "sidecar"
CAPTION_FROM_LIST = "list"
CAPTION_FROM_TAR = "tar"
CAPTION_FROM_MODEL = "model"

# ---- audio (docs/design-decisions.md#log-mel-features) --------------------------------------------------------------
# The log-mel parameters are models.mel.MelConfig's — with encode.audio_vae that VAE folder's own (its config.json),
# handed to every audio stage by the driver (pipelines.encode.run_mel); decoding resamples every clip to its sample
# rate. SAMPLE_RATE is the default's.
SAMPLE_RATE = MelConfig().sample_rate
# Keys of an audio sample's json: the caption for the audio model's second text encoder (a source's own — a sidecar
# json / list column / tar json "structured_caption" — else the caption itself), the clip's duration as decoded (s) and
# the silence appended to reach the bucket (s; bucket.audio_pad_to_s), next to "crop_start_s" (s cut from the start).
STRUCTURED_CAPTION = "structured_caption"
DURATION = "duration_s"
PAD = "pad_s"
CROP_START = "crop_start_s"

# ---- images (docs/official-formats.md#buckets) ----------------------------------------------------------------------
# Pixels, latents and tokens (VAE ×8, DiT patch 2: 16 pixels per token side) are models/geometry.py's to state.

# ---- stages and reject reasons -------------------------------------------------------------------------------------
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_CAPTION = "caption"
STAGE_FILTER = "filter"
STAGE_SCORE = "score"
STAGE_DEDUP = "dedup"
STAGE_BUCKET = "bucket"
STAGE_ENCODE = "encode"
STAGE_WRITE = "write"


class Reason:
    """Reject reasons recorded in rejects.parquet and stats.json (one vocabulary for every stage)."""

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"  # the file could not be fetched
    NOT_DECODABLE = "not_decodable"  # not an image / audio / mesh the decoder understands
    TRUNCATED = "truncated"
    BAD_FORMAT = "bad_format"
    BAD_MODE = "bad_mode"
    TOO_MANY_PIXELS = "too_many_pixels"  # decompression-bomb limit
    NAN = "nan"
    SILENT = "silent"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    EMPTY_SHAPE = "empty_shape"
    DEGENERATE = "degenerate"
    TOO_FEW_POINTS = "too_few_points"
    NO_CAPTION = "no_caption"
    NO_LABEL = "no_label"  # read.label_from is set and the source names no label
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    LOW_CLIP_SCORE = "low_clip_score"
    LOW_AESTHETIC = "low_aesthetic"
    LOW_CLAP_SCORE = "low_clap_score"
    NO_BUCKET = "no_bucket"
    ERROR = "error"  # anything unexpected: counted, never fatal
