"""Reading prepared shards back (the trainer's side of docs/architecture.md#shards-and-manifest).

    from pipelines.shards import read_manifest, iter_samples
    manifest = read_manifest("s3://bucket/prepared")          # pyarrow table, one row per committed shard
    for row in manifest.to_pylist():                           # row["shape"], row["micro_batch"], row["member"]
        for sample in iter_samples(shard_url("s3://bucket/prepared", row["path"])):
            sample["tensor"], sample["caption"], sample["meta"]  # numpy array of shape row["shape"]
    shard_encoders(list_shards("s3://bucket/prepared", modality="image"))  # {"vae": {...}, "text_encoder": {...}}
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.storage import filesystem
from pipelines import constants as C
from pipelines.io import options_for, resolve_storage


def _options(url: str) -> dict:
    return options_for(url, resolve_storage("s3://"))


def read_manifest(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = filesystem(output, storage_options if storage_options is not None else _options(output))
    return pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{C.MANIFEST_FILE}")))


def read_null_text(output: str, storage_options: dict | None = None) -> np.ndarray | None:
    """The empty prompt's features (L, D) written beside shards that carry text.npy; None when there are none."""
    fs, root = filesystem(output, storage_options if storage_options is not None else _options(output))
    path = f"{root}/{C.NULL_TEXT_FILE}"
    return np.load(io.BytesIO(fs.cat_file(path))) if fs.exists(path) else None


def read_labels(output: str, storage_options: dict | None = None) -> dict | None:
    """The output's ``labels.json`` (read.label_from: label_from, label_column, class_names); None when unlabelled."""
    fs, root = filesystem(output, storage_options if storage_options is not None else _options(output))
    path = f"{root}/{C.LABELS_FILE}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def read_rejects(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = filesystem(output, storage_options if storage_options is not None else _options(output))
    return pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{C.REJECTS_FILE}")))


def shard_url(output: str, path: str) -> str:
    return f"{str(output).rstrip('/')}/{path}"


def list_shards(output: str, modality: str | None = None, bucket: str | None = None,
                storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Manifest rows (dicts) of the committed shards, optionally of one modality / bucket."""
    rows = read_manifest(output, storage_options).to_pylist()
    return [r for r in rows if (modality is None or r["modality"] == modality) and (bucket is None or r["bucket"] == bucket)]


def encoder_json(record: dict[str, Any] | None) -> str | None:
    """An encoder record as a manifest cell: canonical JSON (sorted keys), or None without an encoder."""
    return None if record is None else json.dumps(record, sort_keys=True)


def shard_encoders(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The encoders that wrote the shards of one modality: ``{"vae": record | None, "text_encoder": record | None}``.

    ``rows`` are manifest rows of ONE modality (``read_manifest(root).to_pylist()`` filtered by ``row["modality"]``, or
    ``list_shards(root, modality=...)``); rows of several modalities raise ValueError, because one modality may
    legitimately have text features and another not (and images and audio have VAEs of their own). Records are those of
    ``constants.VAE_RECORD_KEYS`` (audio: ``AUDIO_VAE_RECORD_KEYS``) / ``constants.TEXT_ENCODER_RECORD_KEYS``, parsed
    from the ``vae`` / ``text_encoder`` columns.

    Every shard must agree, else ValueError naming two shards (their paths) and their records:

    - ``vae`` is judged over the latent shards only (member ``latent.npy``): the image VAE's record for image latents,
      the mel VAE's (``constants.AUDIO_VAE_RECORD_KEYS``, with its mel parameters) for audio latents; images stored as
      images, audio stored as log-mel and point shards carry no VAE, so a modality without latent shards gives None.
      Latent shards that all lack the record (a manifest written before the records existed: the column is missing or null) give None, "unknown";
      some latent shards with a record and some without is an error, as are two different records.
    - ``text_encoder`` is judged over every row: None when no shard records one (no precomputed text features, or an
      older manifest); a shard with a record next to one without (features from a text encoder next to shards without
      features or with unknown ones) is an error, as are two different records.

    A missing column (older manifests) reads as null. jobs.prepare refuses to resume into an output whose shards would
    end up disagreeing, so this raises only for outputs assembled by other means.
    """
    modalities = sorted({str(r.get("modality")) for r in rows})
    if len(modalities) > 1:
        raise ValueError(f"shard_encoders takes the manifest rows of one modality, got {modalities}: filter the rows by "
                         "row['modality'] first")
    return {
        C.MANIFEST_VAE: _agreed(C.MANIFEST_VAE, [r for r in rows if r.get("member") == C.LATENT_MEMBER]),
        C.MANIFEST_TEXT_ENCODER: _agreed(C.MANIFEST_TEXT_ENCODER, rows),
    }


_NO_RECORD = {C.MANIFEST_VAE: "no vae record (written by an older jobs.prepare)",
              C.MANIFEST_TEXT_ENCODER: "no text_encoder record (no precomputed text features, or an older jobs.prepare)"}


def _agreed(column: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    first: tuple[str, dict | None] | None = None
    for row in rows:
        value = row.get(column)
        record = json.loads(value) if value is not None else None
        if first is None:
            first = (row.get("path"), record)
        elif record != first[1]:
            def show(rec):
                return _NO_RECORD[column] if rec is None else json.dumps(rec, sort_keys=True)

            raise ValueError(
                f"the shards disagree on the {column} that wrote them: {first[0]} has {show(first[1])}, "
                f"{row.get('path')} has {show(record)}; shards of one modality must come from one {column} "
                "(prepare the data again into a new output with one encoder)")
    return first[1] if first else None


def decode_member(name: str, data: bytes) -> Any:
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name == C.CAPTION_MEMBER:
        return data.decode("utf-8")
    if name == C.META_MEMBER:
        return json.loads(data)
    if name in C.IMAGE_FORMATS:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return data


def iter_samples(url: str, storage_options: dict | None = None, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: ``key``, ``tensor`` (the member named in the json), ``caption``, ``meta``,
    ``text_features`` when present, and every member by name."""
    fs, path = filesystem(url, storage_options if storage_options is not None else _options(url))
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] = {}
        for info in tar:
            if not info.isfile():
                continue
            key, member = info.name.split(".", 1)
            if current and current["key"] != key:
                yield _finish(current, decode)
                current = {}
            current.setdefault("key", key)
            current[member] = tar.extractfile(info).read()
        if current:
            yield _finish(current, decode)


def _finish(raw: dict[str, Any], decode: bool) -> dict[str, Any]:
    if not decode:
        return raw
    sample = {name: (decode_member(name, data) if name != "key" else data) for name, data in raw.items()}
    meta = sample.get(C.META_MEMBER, {})
    sample["meta"] = meta
    sample["caption"] = sample.get(C.CAPTION_MEMBER, "")
    sample["tensor"] = sample.get(meta.get("member"))
    if C.TEXT_FEATURES_MEMBER in sample:
        sample["text_features"] = sample[C.TEXT_FEATURES_MEMBER]
    return sample
