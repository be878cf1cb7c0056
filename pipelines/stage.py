"""The stage framework every pipeline stage is built on: ``Stage`` (the base class), ``Reject``, the conversion between
Ray Data's numpy batches and the row dicts the stages work on, and ``StageChain``, which runs consecutive stages in one
Ray Data operator, times them and reports to the run's ledger (``pipelines.ledger``).

``Stage`` turns exceptions on single rows into rejects (issue: "every rejected input is counted with stage and reason;
one bad file never fails the job").
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from pipelines import constants as C
from pipelines.ledger import report


class Reject(Exception):
    """Raised by per-sample code to reject the sample with a reason from ``constants.Reason``."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


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
    stays parsed between stages), and the ledger gets one call per batch (and one per process that builds the chain).

    ``stages``: (stage class, constructor kwargs) pairs, built here so that a chain is itself a Ray Data callable class.
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]], ledger: str | None = None):
        import ray

        # the run's ledger actor, looked up by name so that no handle has to be pickled into every task
        self._ledger = ray.get_actor(ledger) if ledger else None
        if self._ledger is not None:
            # once per process, before the models load: stats.json's "processes" says how far a pool grew, an actor
            # still loading its model when the input runs out included; awaited, so that an actor the pool stops at
            # the end of the run cannot take an unsent count with it
            ray.get(self._ledger.started.remote([cls.stage for cls, _ in stages]))
        self.stages = [cls(**kwargs) for cls, kwargs in stages]

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


def structured_caption(given: Any, caption: str) -> str:
    """The caption of an audio sample's second text encoder (``constants.STRUCTURED_CAPTION``): the source's own — a
    string as it is, anything else (a mapping of tags, a list) as its canonical JSON — else the caption itself."""
    if isinstance(given, str):
        return given if given.strip() else caption
    if given is None or given in ({}, []):
        return caption
    return json.dumps(given, sort_keys=True, default=str)


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
