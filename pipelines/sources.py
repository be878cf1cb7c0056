"""Inputs → items: one row per media file to curate (issue "Sources").

An input URI (local path or any fsspec URL, s3:// included) is one of
- a folder or a glob of media files (images, audio, 3D) — sidecar captions ``NAME.txt`` / ``NAME.json`` are paired by stem;
- a list file (``.parquet`` / ``.csv`` / ``.jsonl``) with a path column and optional caption and metadata columns;
- existing WebDataset tars, expanded member by member (items address a byte range inside the tar, so no bytes move
  until the decode stage reads them).

Every item gets a key: 16 hex digits of a hash of its source URI. Keys are stable across reruns, which is what lets a
rerun skip what an earlier run already wrote or rejected.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from typing import Any, Iterable

import pyarrow as pa

from models.storage import filesystem
from pipelines import constants as C
from pipelines.io import is_local, options_for, unstrip

PATH_COLUMNS = ("path", "uri", "url", "file", "filename", "image", "audio", "mesh")
CAPTION_COLUMNS = ("caption", "text", "prompt")
GLOB_CHARS = "*?["

ITEM_SCHEMA = pa.schema(
    [(C.KEY, pa.string()), (C.SOURCE, pa.string()), (C.MODALITY, pa.string()), (C.OFFSET, pa.int64()),
     (C.LENGTH, pa.int64()), (C.CAPTION, pa.string()), (C.CAPTION_SOURCE, pa.string()), (C.CAPTION_URI, pa.string()),
     (C.META, pa.string())]
)


def key_of(source: str) -> str:
    """Stable 64-bit key of a source URI, as 16 hex digits (no dots: WebDataset splits keys at the first dot)."""
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def extension(path: str) -> str:
    name = posixpath.basename(path)
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def modality_of(path: str) -> str | None:
    ext = extension(path)
    if ext in C.IMAGE_EXTENSIONS:
        return C.IMAGE
    if ext in C.AUDIO_EXTENSIONS:
        return C.AUDIO
    if ext in C.POINTS_EXTENSIONS:
        return C.POINTS
    return None


def make_item(source: str, modality: str, *, offset: int = -1, length: int = -1, caption: str = "",
              caption_source: str = "", caption_uri: str = "", meta: dict | None = None) -> dict[str, Any]:
    return {C.KEY: key_of(source), C.SOURCE: source, C.MODALITY: modality, C.OFFSET: offset, C.LENGTH: length,
            C.CAPTION: caption, C.CAPTION_SOURCE: caption_source, C.CAPTION_URI: caption_uri,
            C.META: json.dumps(meta or {}, sort_keys=True, default=str)}


def list_inputs(uris: Iterable[str], s3_options: dict | None = None) -> tuple[list[dict], list[str]]:
    """(items of media files and list files, URLs of tars to expand)."""
    items: list[dict] = []
    tars: list[str] = []
    for uri in uris:
        fs, path = filesystem(uri, options_for(uri, s3_options))
        if any(ch in path for ch in GLOB_CHARS):
            files = sorted(fs.glob(path))
            siblings = _siblings(fs, files)
        elif fs.isdir(path):
            files = sorted(fs.find(path))
            siblings = set(files)
        elif fs.exists(path):
            files, siblings = [path], _siblings(fs, [path])
        else:
            raise FileNotFoundError(f"input {uri!r} does not exist")
        for f in files:
            ext = extension(f)
            if ext in C.TAR_EXTENSIONS:
                tars.append(unstrip(fs, f))
            elif ext in C.LIST_EXTENSIONS:
                items.extend(read_list(unstrip(fs, f), options_for(uri, s3_options)))
            elif (modality := modality_of(f)) is not None:
                items.append(_file_item(fs, f, modality, siblings))
    return items, tars


def _siblings(fs, files: list[str]) -> set[str]:
    """Every file in the folders of ``files`` (to find sidecar captions next to globbed media)."""
    out: set[str] = set()
    for parent in sorted({posixpath.dirname(f) for f in files}):
        try:
            out.update(fs.ls(parent, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            pass
    return {p.rstrip("/") for p in out}


def _file_item(fs, path: str, modality: str, siblings: set[str]) -> dict[str, Any]:
    stem = path.rsplit(".", 1)[0]
    caption_uri = ""
    for ext in C.CAPTION_EXTENSIONS:
        if f"{stem}.{ext}" in siblings:
            caption_uri = unstrip(fs, f"{stem}.{ext}")
            break
    return make_item(unstrip(fs, path), modality, caption_uri=caption_uri,
                     caption_source=C.CAPTION_FROM_SIDECAR if caption_uri else "")


def read_list(url: str, options: dict | None) -> list[dict[str, Any]]:
    """Rows of a parquet / CSV / JSONL list → items. Relative paths are resolved against the list's folder."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    fs, path = filesystem(url, options)
    ext = extension(path)
    with fs.open(path, "rb") as f:
        data = f.read()
    if ext == "parquet":
        table = pq.read_table(io.BytesIO(data))
    elif ext == "csv":
        table = pcsv.read_csv(io.BytesIO(data))
    else:
        table = pjson.read_json(io.BytesIO(data))
    names = table.column_names
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    if path_col is None:
        raise ValueError(f"{url}: no path column (one of {PATH_COLUMNS}) among {names}")
    caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
    base = posixpath.dirname(path)
    items = []
    for row in table.to_pylist():
        target = str(row.pop(path_col))
        if "://" not in target and not target.startswith("/"):
            target = posixpath.normpath(posixpath.join(base, target))
            target = unstrip(fs, target) if not is_local(fs) else target
        caption = row.pop(caption_col, None) if caption_col else None
        modality = modality_of(target)
        if modality is None:
            continue
        meta = {k: v for k, v in row.items() if v is not None}
        items.append(make_item(target, modality, caption=str(caption or ""),
                               caption_source=C.CAPTION_FROM_LIST if caption else "", meta=meta))
    return items


def expand_tar(url: str, options: dict | None) -> list[dict[str, Any]]:
    """Items of one WebDataset tar: each sample's media member as a byte range; its ``txt`` / ``json`` read inline."""
    fs, path = filesystem(url, options)
    samples: dict[str, dict[str, Any]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            sample_key = posixpath.join(posixpath.dirname(info.name), stem)
            entry = samples.setdefault(sample_key, {})
            last = ext.rsplit(".", 1)[-1].lower()
            if ext == "txt":
                entry["caption"] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
            elif ext == "json":
                try:
                    entry["meta"] = json.loads(tar.extractfile(info).read())
                except ValueError:
                    entry["meta"] = {}
            elif modality_of(base) is not None and "member" not in entry:
                entry["member"] = (ext, last, info.offset_data, info.size)
    items = []
    for sample_key, entry in samples.items():
        if "member" not in entry:
            continue
        ext, last, offset, size = entry["member"]
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        caption = entry.get("caption") or next((str(meta[c]) for c in CAPTION_COLUMNS if meta.get(c)), "")
        source = f"{url}#{sample_key}.{ext}"
        items.append(make_item(source, modality_of(f"x.{last}"), offset=offset, length=size, caption=caption,
                               caption_source=C.CAPTION_FROM_TAR if caption else "", meta=meta))
    return items


def split_source(source: str) -> tuple[str, str]:
    """``tar_url#member`` → (tar_url, member); a plain URL → (url, "")."""
    if "#" in source:
        url, member = source.rsplit("#", 1)
        return url, member
    return source, ""


def items_table(items: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(items, schema=ITEM_SCHEMA)
