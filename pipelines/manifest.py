"""The committed state of an output: shard sidecars → manifest.parquet, reject parts → rejects.parquet, done keys.

docs/architecture.md#shards-and-manifest:
one row per shard (path, modality, bucket, tensor shape, sample count, bytes, checksum; the
VAE and text encoder that wrote it); rejects.parquet (key, source, stage, reason, message); a shard appears in the
manifest only after it is completely written. Everything here is rebuilt from commit records (sidecars, reject parts),
never from in-memory state, so a rerun after any interruption sees exactly what was committed.
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from models.storage import filesystem
from pipelines import constants as C
from pipelines.io import write_atomic
from pipelines.ledger import REJECT_SCHEMA

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [("path", pa.string()), ("modality", pa.string()), ("bucket", pa.string()), ("member", pa.string()),
     ("shape", pa.list_(pa.int64())), ("dtype", pa.string()), ("micro_batch", pa.int64()), ("samples", pa.int64()),
     ("bytes", pa.int64()), ("sha256", pa.string()), ("run_id", pa.string()),
     # canonical JSON of the encoder records (constants.VAE_RECORD_KEYS / TEXT_ENCODER_RECORD_KEYS), null without one
     (C.MANIFEST_VAE, pa.string()), (C.MANIFEST_TEXT_ENCODER, pa.string())]
)


class OutputState:
    """What earlier runs committed to ``output``."""

    def __init__(self, output: str, s3_options: dict | None = None):
        self.output = output
        self.fs, self.root = filesystem(output, s3_options)
        self.sidecars: list[dict[str, Any]] = []
        self.rejects = pa.Table.from_pylist([], schema=REJECT_SCHEMA)

    # -- reading ----------------------------------------------------------------------------------------------------
    def load(self) -> OutputState:
        pattern = f"{self.root}/{C.SHARDS_DIR}/*/*/*{C.SIDECAR_SUFFIX}"
        paths = sorted(self.fs.glob(pattern))
        with ThreadPoolExecutor(16) as pool:  # object stores: many small GETs in parallel
            self.sidecars = list(pool.map(lambda p: json.loads(self.fs.cat_file(p)), paths))
        parts = sorted(self.fs.glob(f"{self.root}/{C.WORK_DIR}/rejects/*.parquet"))
        tables = [pq.read_table(io.BytesIO(self.fs.cat_file(p))) for p in parts]
        if tables:
            self.rejects = pa.concat_tables([t.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA) for t in tables])
        return self

    def written_keys(self) -> set[str]:
        return {r["key"] for s in self.sidecars for r in s["records"]}

    def done_keys(self) -> set[str]:
        """Keys a rerun must skip: written into a committed shard, or rejected in a committed reject part."""
        return self.written_keys() | set(self.rejects.column("key").to_pylist())

    def hash_records(self) -> list[tuple[str, str, int]]:
        """(key, sha256, phash) of every written sample: the seed of the dedup index."""
        return [(r["key"], r["sha256"], int(r["phash"])) for s in self.sidecars for r in s["records"]]

    def next_indices(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sidecars:
            slot = f"{s['modality']}/{s['bucket']}"
            index = int(s["path"].rsplit("/", 1)[1].split(".")[0])
            out[slot] = max(out.get(slot, 0), index + 1)
        return out

    # -- writing ----------------------------------------------------------------------------------------------------
    def remove_uncommitted(self) -> int:
        """Delete what an interrupted run left behind: temporary files and tars without a sidecar.

        Safe because a given output is written by one run at a time (documented in docs/curation.md).
        """
        shard_root = f"{self.root}/{C.SHARDS_DIR}"
        if not self.fs.exists(shard_root):
            return 0
        committed = {f"{self.root}/{s['path']}" for s in self.sidecars}
        removed = 0
        for path in self.fs.find(shard_root):
            name = path.rsplit("/", 1)[1]
            if name.endswith(".tmp") or (name.endswith(C.SHARD_SUFFIX) and path not in committed):
                self.fs.rm(path)
                removed += 1
        if removed:
            log.info("removed %d uncommitted file(s) left by an interrupted run", removed)
        return removed

    def manifest_table(self) -> pa.Table:
        rows = [{k: s.get(k) for k in MANIFEST_SCHEMA.names} for s in sorted(self.sidecars, key=lambda s: s["path"])]
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)

    def rejects_table(self) -> pa.Table:
        """One row per rejected key (a key judged in two runs keeps its first verdict)."""
        seen, keep = set(), []
        for i, key in enumerate(self.rejects.column("key").to_pylist()):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        return self.rejects.take(pa.array(keep, type=pa.int64()))

    def write_tables(self) -> tuple[pa.Table, pa.Table]:
        manifest, rejects = self.manifest_table(), self.rejects_table()
        for name, table in ((C.MANIFEST_FILE, manifest), (C.REJECTS_FILE, rejects)):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            write_atomic(self.fs, f"{self.root}/{name}", sink.getvalue().to_pybytes())
        return manifest, rejects

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.fs, f"{self.root}/{name}", json.dumps(data, indent=2, sort_keys=True, default=str).encode())
