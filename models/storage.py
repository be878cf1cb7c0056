"""fsspec access to local paths and object stores (s3://) with the standard AWS variables.

Every job that takes a URI goes through here, so S3 settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) are honoured the same way everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


def storage_options(url: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``url``: S3 endpoint / region / credentials from the environment, then ``extra``."""
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        client_kwargs: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
            if os.environ.get("AWS_SESSION_TOKEN"):
                options["token"] = os.environ["AWS_SESSION_TOKEN"]
    options.update(extra or {})
    return options


def filesystem(url: str, extra: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options(str(url), extra))
    return fs, path


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join URL/path components with '/' (works for s3:// and local paths)."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out
