"""fsspec access to local paths and object stores (s3://) with the standard AWS variables.

Every job that takes a URI goes through here, so S3 settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) are honoured the same way everywhere. Remote files are staged here too: read
through ``local_copy`` (one use) or ``local_path`` (a cached copy, for models many workers load), written through
``staged_output`` (write locally, then upload). A Hugging Face Hub id (``org/name``, ``org/name@revision``) names a
model folder too: ``hub_snapshot`` resolves it through ``huggingface_hub``'s cache (docs/architecture.md#model-paths).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

COMPLETE_MARKER = ".complete"  # written last into a cached copy: its presence means the copy is whole


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


CREDENTIAL_OPTIONS = ("key", "secret", "token")  # the storage_options entries that hold credentials


def without_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` to hand to Ray tasks and actors: the endpoint and region, no credentials. A Ray worker's
    ``filesystem`` takes those from its own node's environment (docs/training.md#credentials-on-a-cluster)."""
    return {k: v for k, v in options.items() if k not in CREDENTIAL_OPTIONS}


def filesystem(url: str, extra: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it without a trailing slash) for a local path or URL: the one way every layer opens a
    URL. ``extra``: options over the environment's (the pipelines pass the ones the driver resolved)."""
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options(str(url), extra))
    return fs, path.rstrip("/") or path


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join URL/path components with '/' (works for s3:// and local paths)."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(uri: str) -> bool:
    """``org/name`` or ``org/name@revision`` that is not a local path (a relative folder of that name wins)."""
    return not is_remote(str(uri)) and bool(HUB_ID.match(str(uri))) and not os.path.exists(str(uri))


def hub_snapshot(uri: str) -> str:
    """The local folder of the Hub repo ``uri`` (``org/name[@revision]``), fetched into the Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``) if it is not there yet, as transformers and diffusers do. ``HF_HUB_OFFLINE=1``
    fetches nothing: a repo missing from the cache is then a FileNotFoundError saying how to get it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_ID.match(str(uri))
    repo, revision = match["repo"], match["revision"]
    try:
        return snapshot_download(repo, revision=revision)
    except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.is_offline_mode():
            raise FileNotFoundError(
                f"{uri!r} is not a local path, and the Hub repo {repo} is not in {where}: HF_HUB_OFFLINE is set, so "
                f"nothing is downloaded; fetch it where the Hub is reachable (`huggingface-cli download {repo}` with "
                "the same HF_HOME) or unset HF_HUB_OFFLINE") from exc
        raise FileNotFoundError(f"{uri!r} is not a local path, and the Hub repo {repo} could not be fetched into "
                                f"{where}: {exc}") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FileNotFoundError(f"{uri!r} is not a local path, and the Hub has no repo {repo}"
                                f"{f' at revision {revision}' if revision else ''} (a gated or private one needs "
                                "HF_TOKEN)") from exc


def resolve_hub(uri: str) -> str:
    """``uri`` itself, or for a Hub id the local folder of its snapshot (``hub_snapshot``)."""
    return hub_snapshot(str(uri)) if is_hub_id(str(uri)) else str(uri)


def local_path(uri: str, cache_dir: str | None = None) -> str:
    """A local path for a model folder or file given as a local path, a hub id or an ``s3://`` URL.

    Remote folders are copied once into a content-addressed cache (``$LUMINA_CACHE`` or ``~/.cache/lumina-ray``) and
    reused: every worker of a job that loads ``encode.vae=s3://…`` downloads it once per machine. A copy is complete
    only when its marker file exists, so an interrupted download is redone, never half-used. A Hub id gives its
    snapshot in the Hugging Face cache (``hub_snapshot``); a local path is returned unchanged. (A copy for one use,
    removed after it, is ``local_copy``.)
    """
    uri = resolve_hub(uri)
    if not is_remote(uri):
        return uri
    root = cache_dir or os.environ.get("LUMINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lumina-ray")
    target = os.path.join(root, "models", hashlib.sha256(str(uri).encode()).hexdigest()[:24])
    fs, remote = filesystem(str(uri))
    leaf = "" if fs.isdir(remote) else os.path.basename(remote.rstrip("/"))
    if os.path.exists(os.path.join(target, COMPLETE_MARKER)):
        return os.path.join(target, leaf) if leaf else target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix="download-", dir=os.path.dirname(target))
    try:
        download(fs, remote, staging)
        open(os.path.join(staging, COMPLETE_MARKER), "w").close()
        try:
            os.rename(staging, target)
        except OSError:  # another worker finished first: use its copy
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(target, leaf) if leaf else target


@contextmanager
def local_copy(uri: str, include: Callable[[str], bool] | None = None) -> Iterator[str]:
    """A local path with the file or folder at ``uri`` for the duration of the block: ``uri`` itself when local, else
    a temporary download, removed afterwards. ``include(relative_path)`` picks which files of a remote folder to fetch
    (default: all)."""
    if not is_remote(str(uri)):
        yield str(uri)
        return
    fs, remote = filesystem(str(uri))
    with tempfile.TemporaryDirectory(prefix="lumina-") as tmp:
        yield download(fs, remote, tmp, include)


@contextmanager
def staged_output(uri: str) -> Iterator[str]:
    """A local folder whose files end up at ``uri``: the folder ``uri`` itself when local, else a temporary folder that
    is uploaded when the block ends without an error (so a failed write leaves nothing behind in the bucket)."""
    if not is_remote(str(uri)):
        os.makedirs(str(uri), exist_ok=True)
        yield str(uri)
        return
    with tempfile.TemporaryDirectory(prefix="lumina-out-") as tmp:
        yield tmp
        fs, remote = filesystem(str(uri))
        fs.put(tmp.rstrip("/") + "/", remote, recursive=True)


def download(fs: fsspec.AbstractFileSystem, remote: str, dest: str,
             include: Callable[[str], bool] | None = None) -> str:
    """Copy the file or folder ``remote`` of ``fs`` into the local folder ``dest``; returns the local path of what was
    copied (``dest`` for a folder, ``dest/NAME`` for a file)."""
    if not fs.exists(remote):
        raise FileNotFoundError(f"nothing at {fs.unstrip_protocol(remote)}")
    if not fs.isdir(remote):
        local = os.path.join(dest, os.path.basename(remote.rstrip("/")))
        fs.get(remote, local)
        return local
    root = remote.rstrip("/")
    if include is None:
        fs.get(root + "/", dest + "/", recursive=True)
        return dest
    for path in fs.find(root):
        relative = os.path.relpath(path, root)
        if include(relative):
            local = os.path.join(dest, relative)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get(path, local)
    return dest
