"""Reading prepared shards back (the trainer's side of architecture.md "Shard layout" / "Manifest").

    from pipelines.shards import read_manifest, iter_samples
    manifest = read_manifest("s3://bucket/prepared")          # pyarrow table, one row per committed shard
    for row in manifest.to_pylist():                           # row["shape"], row["micro_batch"], row["member"]
        for sample in iter_samples(shard_url("s3://bucket/prepared", row["path"])):
            sample["tensor"], sample["caption"], sample["meta"]  # numpy array of shape row["shape"]
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import constants as C
from pipelines.io import open_fs, options_for, resolve_storage


def _options(url: str) -> dict:
    return options_for(url, resolve_storage("s3://"))


def read_manifest(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = open_fs(output, storage_options if storage_options is not None else _options(output))
    return pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{C.MANIFEST_FILE}")))


def read_null_text(output: str, storage_options: dict | None = None) -> np.ndarray | None:
    """The empty prompt's features (L, D) written beside shards that carry text.npy; None when there are none."""
    fs, root = open_fs(output, storage_options if storage_options is not None else _options(output))
    path = f"{root}/{C.NULL_TEXT_FILE}"
    return np.load(io.BytesIO(fs.cat_file(path))) if fs.exists(path) else None


def read_rejects(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = open_fs(output, storage_options if storage_options is not None else _options(output))
    return pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{C.REJECTS_FILE}")))


def shard_url(output: str, path: str) -> str:
    return f"{str(output).rstrip('/')}/{path}"


def list_shards(output: str, modality: str | None = None, bucket: str | None = None,
                storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Manifest rows (dicts) of the committed shards, optionally of one modality / bucket."""
    rows = read_manifest(output, storage_options).to_pylist()
    return [r for r in rows if (modality is None or r["modality"] == modality) and (bucket is None or r["bucket"] == bucket)]


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
    fs, path = open_fs(url, storage_options if storage_options is not None else _options(url))
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
