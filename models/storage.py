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


def local_path(uri: str, cache_dir: str | None = None) -> str:
    """A local path for a model folder or file given as a local path, a hub id or an ``s3://`` URL.

    Remote folders are copied once into a content-addressed cache (``$LUMINA_CACHE`` or ``~/.cache/lumina-ray``) and
    reused: every worker of a job that loads ``encode.vae=s3://…`` downloads it once per machine. A copy is complete
    only when its marker file exists, so an interrupted download is redone, never half-used. Local paths and hub ids are
    returned unchanged.
    """
    import hashlib
    import shutil
    import tempfile

    if not is_remote(str(uri)):
        return str(uri)
    root = cache_dir or os.environ.get("LUMINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lumina-ray")
    target = os.path.join(root, "models", hashlib.sha256(str(uri).encode()).hexdigest()[:24])
    marker = os.path.join(target, ".complete")
    if os.path.exists(marker):
        return target
    fs, remote = filesystem(str(uri))
    if not fs.exists(remote):
        raise FileNotFoundError(f"no model at {uri}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix="download-", dir=os.path.dirname(target))
    try:
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", staging + "/", recursive=True)
        else:
            fs.get(remote, os.path.join(staging, os.path.basename(remote)))
        open(os.path.join(staging, ".complete"), "w").close()
        try:
            os.rename(staging, target)
        except OSError:  # another worker finished first: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    if fs.isdir(remote):
        return target
    return os.path.join(target, os.path.basename(remote))
