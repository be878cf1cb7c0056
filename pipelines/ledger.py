"""The ledger: where every stage reports what it read, kept and rejected (issue: "every rejected input is counted with
stage and reason; one bad file never fails the job").

One named Ray actor per run (``plan.RunRecords``, which also holds the dedup index) keeps the counters and buffers
reject rows; it commits them as parquet parts under ``OUTPUT/_work/rejects/`` (written whole, then renamed), so a rerun
knows which inputs were already judged and ``rejects.parquet`` never lists an input twice. The stages
(``pipelines.stage``) report to it through ``report``, one round trip per batch.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import pyarrow as pa

from models.storage import filesystem
from pipelines import constants as C
from pipelines.io import write_atomic

log = logging.getLogger(__name__)

REJECT_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("modality", pa.string()), ("stage", pa.string()),
     ("reason", pa.string()), ("message", pa.string())]
)


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

    def started(self, stages: list[str]) -> None:
        """A process is building these stages (``stage.StageChain``): an actor of a model stage's pool, a worker
        process of a task stage; stats.json reports the count as each stage's ``processes``."""
        for stage in stages:
            self.counts[stage]["processes"] += 1

    def flush(self) -> int:
        """Commit the buffered reject rows as one parquet part; returns how many were written."""
        if not self.pending:
            return 0
        rows, self.pending = self.pending, []
        table = pa.Table.from_pylist([{k: r.get(k) for k in REJECT_SCHEMA.names} for r in rows], schema=REJECT_SCHEMA)
        fs, root = filesystem(self.output, self.storage)
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


def report(ledger, records: list[tuple[str, int, int, float, list[dict]]]) -> None:
    """Counts of one batch, every stage of it in one round trip. Synchronous: a reject is counted before the batch moves
    on, so a finished dataset means complete counts."""
    if ledger is not None and records:
        import ray

        ray.get(ledger.record_many.remote(records))
