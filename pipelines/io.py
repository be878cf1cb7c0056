"""Storage helpers for the curation job: S3 options resolved once, atomic writes, byte ranges (files are opened with
``models.storage.filesystem``, like everywhere else).

S3 settings come from the standard AWS variables (``models.storage``) or ``PrepareConfig.storage``; they are resolved once
on the driver and handed to every stage, because Ray workers do not necessarily share the driver's environment.
"""

from __future__ import annotations

import uuid
from typing import Any

import fsspec

from models.storage import storage_options


def resolve_storage(url: str, storage_config: Any = None) -> dict[str, Any]:
    """fsspec options for ``url``: the AWS environment first, then the fields set in ``storage_config``."""
    options = storage_options(url)
    if storage_config is None or not str(url).startswith(("s3://", "s3a://")):
        return options
    client = dict(options.get("client_kwargs", {}))
    if storage_config.endpoint_url:
        client["endpoint_url"] = storage_config.endpoint_url
    if storage_config.region:
        client["region_name"] = storage_config.region
    if client:
        options["client_kwargs"] = client
    if storage_config.access_key_id:
        options["key"] = storage_config.access_key_id
        options["secret"] = storage_config.secret_access_key
    return options


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for ``path`` on ``fs`` (adds s3:// back; local paths stay plain)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    Object stores publish an object only when its upload completes, so a direct write is already atomic there; on a
    local or network filesystem we write a temporary sibling and rename it.
    """
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_range(fs: fsspec.AbstractFileSystem, path: str, offset: int = -1, length: int = -1) -> bytes:
    """The whole file, or ``length`` bytes at ``offset`` (a member inside a tar)."""
    if offset < 0:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + length)


def options_for(url: str, s3_options: dict[str, Any] | None) -> dict[str, Any]:
    """The S3 options for s3:// URLs, nothing for local paths."""
    return dict(s3_options or {}) if str(url).startswith(("s3://", "s3a://")) else {}
