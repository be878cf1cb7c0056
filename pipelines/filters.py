"""Filters (issue "Stages: filter"): rules and exact / perceptual dedup — each reject with its reason (model scores:
``pipelines.scores``; this module stays free of torch so that CPU task workers start fast).

Order in the plan: cheap rules right after decode (so no model sees a sample that fails them), scores after captioning
(CLIP similarity needs the caption), dedup last (a sample claims its hash only once every other filter has passed it,
so a duplicate is never dropped in favour of a sample that is itself rejected later).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from models.config_io import from_dict
from pipelines import constants as C
from pipelines.config import PrepareConfig, mel_config
from pipelines.stage import Reject, Stage, meta_of, reject_row

R = C.Reason


class RuleFilter(Stage):
    """Resolution and aspect (images), duration (audio), point count (3D)."""

    stage = C.STAGE_FILTER

    def __init__(self, config: dict, mel: dict | None = None):
        self.cfg = from_dict(PrepareConfig, config).filter
        self.sample_rate = mel_config(mel).sample_rate  # of the decoded audio (encode.run_mel)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg, modality = self.cfg, row[C.MODALITY]
        if modality == C.IMAGE:
            meta = meta_of(row)
            w, h = meta["width"], meta["height"]
            if min(w, h) < cfg.min_image_side:
                raise Reject(R.TOO_SMALL, f"{w}x{h} < {cfg.min_image_side} px")
            if max(w, h) / min(w, h) > cfg.max_image_aspect:
                raise Reject(R.BAD_ASPECT, f"{w}x{h} aspect > {cfg.max_image_aspect}")
        elif modality == C.AUDIO:
            duration = len(row[C.PAYLOAD]) / self.sample_rate
            if duration < cfg.min_duration_s:
                raise Reject(R.TOO_SHORT, f"{duration:.2f}s < {cfg.min_duration_s}s")
            if duration > cfg.max_duration_s:
                raise Reject(R.TOO_LONG, f"{duration:.2f}s > {cfg.max_duration_s}s")
        elif modality == C.POINTS:
            if len(row[C.PAYLOAD]) < cfg.min_points:
                raise Reject(R.TOO_FEW_POINTS, f"{len(row[C.PAYLOAD])} < {cfg.min_points}")
        return row


# ---- dedup -------------------------------------------------------------------------------------------------------------
class DedupIndex:
    """Every content hash this output has accepted (held by the run's records actor, ``plan.RunRecords``): seeded from
    the committed shards, so a rerun also rejects duplicates of samples written by earlier runs.

    Perceptual near-duplicates within ``max_distance`` bits are found by banding: split the 64-bit hash into
    ``max_distance + 1`` bands; by pigeonhole two hashes that close agree on at least one band, so only hashes sharing a
    band are compared.
    """

    def __init__(self, max_distance: int = 0):
        self.max_distance = max_distance
        self.bands = max_distance + 1
        self.exact: dict[str, str] = {}
        self.band_index: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.phash_keys: dict[int, str] = {}

    def _bands(self, h: int) -> list[int]:
        u = h & ((1 << 64) - 1)
        width = 64 // self.bands
        out = []
        for b in range(self.bands):
            lo = b * width
            hi = 64 if b == self.bands - 1 else lo + width
            out.append((u >> lo) & ((1 << (hi - lo)) - 1))
        return out

    def _near(self, h: int) -> str | None:
        if h in self.phash_keys:
            return self.phash_keys[h]
        if self.max_distance == 0:
            return None
        for b, value in enumerate(self._bands(h)):
            for other in self.band_index[b].get(value, ()):
                if bin((h ^ other) & ((1 << 64) - 1)).count("1") <= self.max_distance:
                    return self.phash_keys[other]
        return None

    def _add_phash(self, h: int, key: str) -> None:
        self.phash_keys[h] = key
        if self.max_distance:
            for b, value in enumerate(self._bands(h)):
                self.band_index[b][value].append(h)

    def seed(self, records: list[tuple[str, str, int]]) -> int:
        for key, sha, phash in records:
            if sha:
                self.exact.setdefault(sha, key)
            if phash:
                self._add_phash(int(phash), key)
        return len(self.exact)

    def check(self, records: list[tuple[str, str, int]], exact: bool, perceptual: bool) -> list[tuple[str, str] | None]:
        """For each (key, sha256, phash): None (accepted and remembered) or (reason, key of the earlier copy)."""
        out = []
        for key, sha, phash in records:
            phash = int(phash)
            if exact and self.exact.get(sha, key) != key:
                out.append((R.DUPLICATE, self.exact[sha]))
                continue
            if perceptual and phash:
                other = self._near(phash)
                if other is not None and other != key:
                    out.append((R.NEAR_DUPLICATE, other))
                    continue
            self.exact.setdefault(sha, key)
            if phash:
                self._add_phash(phash, key)
            out.append(None)
        return out


class Dedup(Stage):
    """Asks the run's dedup index (``index``: the name of the actor that holds it, ``plan.RunRecords``) about a whole
    batch at once (one round trip per batch)."""

    stage = C.STAGE_DEDUP

    def __init__(self, config: dict, index: str):
        import ray

        self.cfg = from_dict(PrepareConfig, config).filter
        self.index = ray.get_actor(index)

    def process_rows(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
        import ray

        if not rows:
            return rows, []
        records = [(str(r[C.KEY]), str(r[C.SHA256]), int(r[C.PHASH])) for r in rows]
        verdicts = ray.get(self.index.check.remote(records, self.cfg.dedup_exact, self.cfg.dedup_perceptual))
        kept, rejects = [], []
        for row, verdict in zip(rows, verdicts):
            if verdict is None:
                kept.append(row)
            else:
                rejects.append(reject_row(row, verdict[0], f"same as {verdict[1]}"))
        return kept, rejects
