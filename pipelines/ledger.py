"""The ledger: where every stage reports what it read, kept and rejected (issue: "every rejected input is counted with
stage and reason; one bad file never fails the job").

One named Ray actor per run holds the counters and buffers reject rows; it commits them as parquet parts under
``OUTPUT/_work/rejects/`` (written whole, then renamed), so a rerun knows which inputs were already judged and
``rejects.parquet`` never lists an input twice. ``Stage`` is the base of every pipeline stage: it turns exceptions on
single rows into rejects. ``StageChain`` runs consecutive stages in one Ray Data operator, times them and reports to
the ledger.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import constants as C
from pipelines.io import open_fs, write_atomic

log = logging.getLogger(__name__)

REJECT_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("modality", pa.string()), ("stage", pa.string()),
     ("reason", pa.string()), ("message", pa.string())]
)


class Reject(Exception):
    """Raised by per-sample code to reject the sample with a reason from ``constants.Reason``."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Ledger:
    """Counters per stage and reason, and the reject rows of this run (a Ray actor; methods are called per batch)."""

    def __init__(self, output: str, storage: dict, run_id: str, flush_rows: int = 1000):
        self.output, self.storage, self.run_id, self.flush_rows = output, storage, run_id, flush_rows
        self.counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.pending: list[dict] = []
        self.parts = 0

    def record(self, stage: str, rows_in: int, rows_out: int, seconds: float, rejects: list[dict]) -> None:
        c = self.counts[stage]
        c["in"] += rows_in
        c["out"] += rows_out
        c["seconds"] += seconds
        c["batches"] += 1
        for r in rejects:
            self.reasons[stage][r["reason"]] += 1
            self.pending.append({**r, "stage": stage})
        if len(self.pending) >= self.flush_rows:
            self.flush()

    def record_many(self, records: list[tuple[str, int, int, float, list[dict]]]) -> None:
        for stage, rows_in, rows_out, seconds, rejects in records:
            self.record(stage, rows_in, rows_out, seconds, rejects)

    def add(self, stage: str, **values: float) -> None:
        for k, v in values.items():
            self.counts[stage][k] += v

    def flush(self) -> int:
        """Commit the buffered reject rows as one parquet part; returns how many were written."""
        if not self.pending:
            return 0
        rows, self.pending = self.pending, []
        table = pa.Table.from_pylist([{k: r.get(k) for k in REJECT_SCHEMA.names} for r in rows], schema=REJECT_SCHEMA)
        fs, root = open_fs(self.output, self.storage)
        path = f"{root}/{C.WORK_DIR}/rejects/{self.run_id}-{self.parts:05d}.parquet"
        self.parts += 1
        sink = pa.BufferOutputStream()
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
        write_atomic(fs, path, sink.getvalue().to_pybytes())
        return len(rows)

    def snapshot(self) -> dict[str, Any]:
        return {
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "reasons": {s: dict(r) for s, r in self.reasons.items()},
        }


def ledger_name(run_id: str) -> str:
    return f"prepare-ledger-{run_id}"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class Stage:
    """Base of the pipeline stages; a ``StageChain`` runs them inside ``Dataset.map_batches`` (numpy batch format).

    Subclasses implement ``process_row(row) -> dict`` (a per-sample transform that may raise ``Reject``) or, for batched
    work (models, round trips to an actor), ``process_rows(rows) -> (rows, rejects)``. Rows that raise anything else are
    rejected with ``Reason.ERROR`` and the exception text: one bad file never fails the job. Stages work on lists of row
    dicts so that a chain of them (``StageChain``) converts a batch to rows and back once, not once per stage.
    """

    stage = "stage"

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return row

    def process_rows(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
        kept, rejects = [], []
        for row in rows:
            try:
                kept.append(self.process_row(row))
            except Reject as r:
                rejects.append(reject_row(row, r.reason, r.message))
            except Exception as exc:  # noqa: BLE001 - any failure of one sample is that sample's reject
                rejects.append(reject_row(row, C.Reason.ERROR, f"{type(exc).__name__}: {exc}"))
        return kept, rejects


class StageChain:
    """Consecutive stages with the same resources, run back to back on one batch in one process (a task for model-free
    stages, an actor for model stages): the batch becomes row dicts once, every stage works on those dicts (metadata
    stays parsed between stages), and the ledger gets one call per batch.

    ``stages``: (stage class, constructor kwargs) pairs, built here so that a chain is itself a Ray Data callable class.
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]], ledger: str | None = None):
        import ray

        self.stages = [cls(**kwargs) for cls, kwargs in stages]
        # the run's ledger actor, looked up by name so that no handle has to be pickled into every task
        self._ledger = ray.get_actor(ledger) if ledger else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        records = []
        for stage in self.stages:
            if not rows:
                break
            start, rows_in = time.perf_counter(), len(rows)
            rows, rejects = stage.process_rows(rows)
            records.append((stage.stage, rows_in, len(rows), time.perf_counter() - start, rejects))
        report(self._ledger, records)
        return batch_of(rows)


def report(ledger, records: list[tuple[str, int, int, float, list[dict]]]) -> None:
    """Counts of one batch, every stage of it in one round trip. Synchronous: a reject is counted before the batch moves
    on, so a finished dataset means complete counts."""
    if ledger is not None and records:
        import ray

        ray.get(ledger.record_many.remote(records))


def reject_row(row: dict[str, Any], reason: str, message: str = "") -> dict[str, str]:
    return {"key": str(row[C.KEY]), "source": str(row.get(C.SOURCE, "")), "modality": str(row.get(C.MODALITY, "")),
            "reason": reason, "message": str(message)[:500]}


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: batch[k][i] for k in names} for i in range(n)]


def batch_of(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows → numpy batch. Ragged arrays become object arrays (Ray stores them as variable-shaped tensors); parsed
    metadata (``meta_of``) goes back to JSON text, the form it has between operators."""
    if not rows:
        return {}  # an empty block: Ray Data drops it without a schema clash
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if k == C.META:
            values = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else v for v in values]
        out[k] = column(values)
    return out


def column(values: list[Any]) -> np.ndarray:
    first = values[0]
    if isinstance(first, np.ndarray):
        if all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype for v in values):
            return np.stack(values)
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr
    if isinstance(first, (bytes, str)):
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr
    return np.asarray(values)


def meta_of(row: dict[str, Any]) -> dict[str, Any]:
    """The row's metadata as a dict, parsed once and kept in the row: stages update it in place, and ``batch_of``
    serialises it when the batch leaves the operator."""
    raw = row.get(C.META)
    if isinstance(raw, dict):
        return raw
    meta = json.loads(raw) if raw else {}
    row[C.META] = meta
    return meta


_CHAIN_CACHE: dict[str, StageChain] = {}


def run_task_chain(batch: dict[str, np.ndarray], stages: list[tuple[type, dict[str, Any]]], ledger: str | None,
                   cache_key: str) -> dict[str, np.ndarray]:
    """Task-side entry of consecutive model-free stages: one chain object per worker process, reused across batches.

    It lives in this light module on purpose: a task worker unpickles it by reference and imports only what the stages
    need (no torch for image decoding), which keeps worker start-up cheap.
    """
    chain = _CHAIN_CACHE.get(cache_key)
    if chain is None:
        chain = _CHAIN_CACHE[cache_key] = StageChain(stages, ledger)
    return chain(batch)
