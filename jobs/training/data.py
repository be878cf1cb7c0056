"""The deterministic, resumable bucketed loader (issue "Bucketed loading"; docs/training.md#batches-and-the-loader).

Every worker runs the same sample-order arithmetic on the same manifest, so all of them agree on every step without talking:

- **Epoch order.** For each bucket, the shards of that bucket are shuffled with a seed of (data.seed, epoch, bucket); the
  concatenation of their sample ranges is cut into ``world`` contiguous, near-equal pieces: worker r reads only its piece
  (the manifest's shards are split across workers; at most one shard is shared by two neighbours).
- **Steps.** At each optimizer step one bucket is drawn (seeded by (seed, epoch, step), weighted by the samples it has
  left) among the buckets that still hold a full global batch (micro-batch × grad_accum × world samples); every worker
  takes the next micro-batch × grad_accum samples of its piece of that bucket. When a worker's piece runs short while
  the bucket still holds a global batch, the bucket's remaining ranges are re-cut evenly. When no bucket holds a global
  batch the epoch ends (the < one-global-batch remainder per bucket is dropped, like ``drop_last``).
- **State.** :class:`LoaderState` is the remaining sample ranges of every worker's piece, plus epoch and step: plain JSON
  that goes into every checkpoint. It is world-size independent in meaning (the set of samples not yet consumed in this
  epoch): resuming on another number of workers re-cuts the remaining ranges, so no sample is consumed twice or skipped.

A sample is identified by its WebDataset key; its noise, t and caption-dropout draws are seeded by (seed, epoch, key)
(:func:`sample_seed`), so they do not depend on which worker happens to read it.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from jobs.training.config import DataConfig
from models.config_io import ConfigError
from models.geometry import latent_size
from pipelines import constants as C
from pipelines.shards import iter_samples, read_labels, read_manifest, read_null_text, shard_encoders, shard_url

log = logging.getLogger(__name__)

Range = list[int]  # [shard index, start, end): a run of samples of one shard


@dataclass(frozen=True)
class ShardInfo:
    index: int  # position in the manifest (sorted by path): the stable id used in the loader state
    path: str  # relative to the data root, as the manifest writes it
    bucket: str
    samples: int
    shape: tuple[int, ...]
    member: str


@dataclass(frozen=True)
class BucketInfo:
    name: str
    shape: tuple[int, ...]  # tensor shape of every sample (latent (C, h, w), or an image (H, W, 3))
    micro_batch: int
    member: str
    shards: tuple[int, ...]

    def grid(self, patch_size: int) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of one sample: a latent (C, h, w) — an audio latent (C, T) is one row of
        T frames —, an image (H, W, 3) counted at its latent size (the VAE's /8), or a cloud (N, 3): one row of N
        points."""
        if self.member == C.POINTS_MEMBER:
            return (1, 1, self.shape[0])
        if self.member == C.LATENT_MEMBER:
            h, w = self.shape[1:] if len(self.shape) == 3 else (1, self.shape[1])
        else:
            h, w = latent_size(self.shape[0], self.shape[1])
        return (1, h // patch_size, w // patch_size)

    def tokens(self, patch_size: int) -> int:
        return math.prod(self.grid(patch_size))


@dataclass
class ShardCatalog:
    """The shards and buckets of one modality, read from the manifest (static for the run; the order in which they are
    drawn is `SampleOrder`'s)."""

    root: str
    shards: list[ShardInfo]
    buckets: dict[str, BucketInfo]
    # The encoders that made the shards' tensors, as jobs.prepare recorded them: {"vae": …, "text_encoder": …}, each
    # a record dict or None (not encoded by a model, or an output of a version that did not record it).
    encoders: dict[str, dict | None] = field(default_factory=lambda: {"vae": None, "text_encoder": None})
    # The output's class names in index order (labels.json, jobs.prepare's read.label_from), None when unlabelled.
    class_names: list[str] | None = None

    @classmethod
    def from_config(cls, data: DataConfig) -> ShardCatalog:
        return cls.from_manifest(data.uri, data.modality, data.micro_batch, data.bucket_micro_batch)

    @classmethod
    def from_manifest(cls, root: str, modality: str = C.IMAGE, micro_batch: int | None = None,
                      bucket_micro_batch: dict[str, int] | None = None) -> ShardCatalog:
        """Read ``root/manifest.parquet``. Micro-batch of a bucket: ``bucket_micro_batch[name]``, else ``micro_batch``,
        else the manifest's. Raises ConfigError for a missing manifest, a bucket without samples, or shards made by
        different encoders."""
        try:
            rows = read_manifest(root).to_pylist()
        except FileNotFoundError as exc:
            raise ConfigError(f"no {C.MANIFEST_FILE} under {root!r}: --data must be a jobs.prepare output") from exc
        rows = sorted((r for r in rows if r["modality"] == modality), key=lambda r: r["path"])
        if not rows:
            raise ConfigError(f"{root}/{C.MANIFEST_FILE} lists no {modality} shards")
        shards = [ShardInfo(i, r["path"], r["bucket"], int(r["samples"]), tuple(r["shape"]), r["member"])
                  for i, r in enumerate(rows)]
        overrides = bucket_micro_batch or {}
        unknown = sorted(set(overrides) - {s.bucket for s in shards})
        if unknown:
            raise ConfigError(f"data.bucket_micro_batch names bucket(s) {unknown} that the manifest does not have "
                              f"(it has {sorted({s.bucket for s in shards})})")
        try:
            encoders = shard_encoders(rows)
        except ValueError as exc:
            raise ConfigError(f"{root}: {exc}; train on shards of one encoder (prepare into separate outputs)") from exc
        buckets = {}
        for name in sorted({s.bucket for s in shards}):
            members = [s for s in shards if s.bucket == name]
            if sum(s.samples for s in members) == 0:
                raise ConfigError(f"bucket {name!r} has no samples in {root}/{C.MANIFEST_FILE}")
            if len({s.shape for s in members}) != 1:
                raise ConfigError(f"bucket {name!r} mixes tensor shapes {sorted({s.shape for s in members})}")
            mb = overrides.get(name) or micro_batch or int(rows[members[0].index]["micro_batch"] or 1)
            buckets[name] = BucketInfo(name, members[0].shape, mb, members[0].member, tuple(s.index for s in members))
        labels = read_labels(root)
        return cls(root, shards, buckets, encoders, labels["class_names"] if labels else None)

    def null_text_features(self) -> np.ndarray | None:
        """The empty prompt's features (L, D) that jobs.prepare wrote beside the shards with text.npy, if any."""
        return read_null_text(self.root)

    def text_feature_width(self) -> int | None:
        """Width of the shards' precomputed caption features (text.npy), read from the first sample; None when the
        shards carry none (captions are then encoded online)."""
        first = next(iter_samples(shard_url(self.root, self.shards[0].path)), {})
        features = first.get(C.TEXT_FEATURES_MEMBER)
        return None if features is None else int(np.asarray(features).shape[-1])

    def drawable(self, world: int, grad_accum: int) -> list[str]:
        """The buckets that hold at least one global batch (the others are never drawn)."""
        return [name for name in self.buckets
                if self.bucket_samples(name) >= self.per_worker(name, grad_accum) * world]

    def bucket_samples(self, name: str) -> int:
        return sum(self.shards[i].samples for i in self.buckets[name].shards)

    def per_worker(self, name: str, grad_accum: int) -> int:
        """Samples one worker consumes per optimizer step from bucket ``name``."""
        return self.buckets[name].micro_batch * grad_accum

    def check(self, world: int, grad_accum: int) -> list[str]:
        """Raise if no bucket holds one global batch (saying what to set); return warnings for buckets too small to
        ever be drawn."""
        warnings, usable = [], 0
        for name, bucket in self.buckets.items():
            need = self.per_worker(name, grad_accum) * world
            have = self.bucket_samples(name)
            if have < need:
                warnings.append(f"bucket {name}: {have} samples < one global batch of {need} (micro-batch "
                                f"{bucket.micro_batch} × {world} worker(s) × grad_accum {grad_accum}); never drawn")
            else:
                usable += 1
        if not usable:
            largest = max(self.buckets, key=self.bucket_samples)
            fits = self.bucket_samples(largest) // (world * grad_accum)
            if fits >= 1:
                advice = (f"set a smaller micro-batch: data.micro_batch={fits} (every bucket; the largest, {largest}, "
                          f"then gives one global batch) or data.bucket_micro_batch.{largest}={fits}")
            else:
                advice = (f"the largest bucket ({largest}) has {self.bucket_samples(largest)} samples, fewer than "
                          f"{world} worker(s) × grad_accum {grad_accum}: use fewer workers or a smaller grad_accum")
            raise ConfigError(f"no bucket holds one global batch for {world} worker(s) × grad_accum {grad_accum}: "
                              + "; ".join(warnings) + f". {advice}")
        return warnings


@dataclass
class LoaderState:
    """What the loader has left to give in the current epoch (JSON; saved in every checkpoint)."""

    seed: int = 0
    epoch: int = -1  # -1: no epoch planned yet
    step: int = 0  # optimizer steps taken
    samples: int = 0  # samples consumed since the start of training (all workers)
    world: int = 1
    queues: dict[str, list[list[Range]]] = field(default_factory=dict)  # bucket → worker → ranges left

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoaderState:
        return cls(**json.loads(text))


@dataclass
class StepSamples:
    """One optimizer step: the bucket and, per worker, the (shard, index) of each sample in consumption order."""

    step: int  # 1-based number of this step
    epoch: int
    bucket: str
    samples: list[list[tuple[int, int]]]


def _rng(*parts: Any) -> np.random.Generator:
    """A generator seeded by stable hashes of ``parts`` (never Python's salted hash())."""
    return np.random.default_rng([zlib.crc32(str(p).encode()) for p in parts])


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Seed of one sample's noise / t / dropout draws: the same whichever worker reads the sample."""
    return zlib.crc32(f"{seed}/{epoch}/{key}".encode()) | (zlib.crc32(f"{key}/{epoch}/{seed}".encode()) << 31)


def _count(ranges: list[Range]) -> int:
    return sum(end - start for _, start, end in ranges)


def cut(ranges: list[Range], world: int) -> list[list[Range]]:
    """Split a list of ranges into ``world`` contiguous pieces whose sizes differ by at most one sample."""
    total = _count(ranges)
    sizes = [total // world + (1 if r < total % world else 0) for r in range(world)]
    pieces: list[list[Range]] = [[] for _ in range(world)]
    worker, room = 0, sizes[0]
    for shard, start, end in ranges:
        while start < end:
            while room == 0:
                worker += 1
                room = sizes[worker]
            take = min(room, end - start)
            pieces[worker].append([shard, start, start + take])
            start += take
            room -= take
    return pieces


class SampleOrder:
    """The sample order (pure arithmetic, no I/O): advances a :class:`LoaderState` one optimizer step at a time."""

    def __init__(self, catalog: ShardCatalog, grad_accum: int, world: int, seed: int):
        self.catalog, self.grad_accum, self.world, self.seed = catalog, grad_accum, world, seed

    def initial_state(self) -> LoaderState:
        return LoaderState(seed=self.seed, world=self.world)

    def adopt(self, state: LoaderState) -> LoaderState:
        """A state saved by another run: re-cut every bucket for this world size (no sample lost or repeated)."""
        if state.seed != self.seed:
            raise ConfigError(f"data.seed {self.seed} differs from the checkpoint's {state.seed}")
        if state.world != self.world:
            log.info("loader: re-cutting the remaining samples from %d to %d worker(s)", state.world, self.world)
            state.queues = {b: cut([r for q in qs for r in q], self.world) for b, qs in state.queues.items()}
            state.world = self.world
        return state

    def _new_epoch(self, state: LoaderState) -> None:
        state.epoch += 1
        state.queues = {}
        for name, bucket in self.catalog.buckets.items():
            order = list(bucket.shards)
            _rng(self.seed, state.epoch, name).shuffle(order)
            ranges = [[i, 0, self.catalog.shards[i].samples] for i in order if self.catalog.shards[i].samples]
            state.queues[name] = cut(ranges, self.world)

    def _eligible(self, state: LoaderState) -> list[str]:
        return [b for b, qs in sorted(state.queues.items())
                if sum(_count(q) for q in qs) >= self.world * self.catalog.per_worker(b, self.grad_accum)]

    def next(self, state: LoaderState) -> StepSamples:
        """Advance ``state`` by one optimizer step (in place) and return what every worker consumes in it."""
        eligible = self._eligible(state) if state.epoch >= 0 else []
        if not eligible:
            self._new_epoch(state)
            eligible = self._eligible(state)
            if not eligible:
                raise ConfigError("no bucket holds one global batch")  # ShardCatalog.check catches this on the driver
        left = np.array([sum(_count(q) for q in state.queues[b]) for b in eligible], dtype=np.float64)
        bucket = eligible[int(_rng(self.seed, state.epoch, state.step, "bucket").choice(len(eligible), p=left / left.sum()))]
        need = self.catalog.per_worker(bucket, self.grad_accum)
        queues = state.queues[bucket]
        if min(_count(q) for q in queues) < need:
            queues = state.queues[bucket] = cut([r for q in queues for r in q], self.world)
        taken = []
        for q in queues:
            mine: list[tuple[int, int]] = []
            while len(mine) < need:
                shard, start, end = q[0]
                take = min(end - start, need - len(mine))
                mine.extend((shard, i) for i in range(start, start + take))
                if start + take == end:
                    q.pop(0)
                else:
                    q[0] = [shard, start + take, end]
            taken.append(mine)
        state.step += 1
        state.samples += need * self.world
        return StepSamples(state.step, state.epoch, bucket, taken)


class ShardReader:
    """Samples of shards read as streams, one sample at a time: a worker's piece of a shard is a contiguous run, so the
    sample it asks for next is almost always the one after the last it read, and the shard's open stream goes on. Any
    other index (a piece that starts mid-shard, a resume, a re-cut) reopens the shard and reads up to it. Memory: the
    sample in hand and the read-ahead buffers of at most ``open_shards`` open streams, whatever the shard size."""

    def __init__(self, catalog: ShardCatalog, open_shards: int = 2):
        self.catalog, self.open_shards = catalog, max(1, open_shards)
        self._streams: OrderedDict[int, tuple[Iterator[dict], int]] = OrderedDict()  # shard → (stream, next index)

    def sample(self, shard: int, index: int) -> dict:
        info = self.catalog.shards[shard]
        stream, position = self._streams.pop(shard, (None, 0))
        if stream is None or index < position:
            if stream is not None:
                stream.close()
            stream, position = iter_samples(shard_url(self.catalog.root, info.path)), 0
        for position in range(position, index + 1):  # noqa: B007 - the samples before ``index`` are skipped
            sample = next(stream, None)
            if sample is None:
                stream.close()
                raise RuntimeError(f"{info.path}: the manifest says {info.samples} samples, the shard holds {position}")
        if index + 1 == info.samples and next(stream, None) is not None:
            stream.close()
            raise RuntimeError(f"{info.path}: the manifest says {info.samples} samples, the shard holds more")
        self._streams[shard] = (stream, index + 1)
        while len(self._streams) > self.open_shards:
            self._streams.popitem(last=False)[1][0].close()
        return sample

    def close(self) -> None:
        while self._streams:
            self._streams.popitem()[1][0].close()


class BucketLoader:
    """One worker's view: each call yields the bucket and this worker's micro-batches (lists of sample dicts).

    With ``prefetch`` > 0 a background thread runs the sample order ahead and reads (from local disk or S3) and decodes
    the samples of up to ``prefetch`` steps while the current ones train, so shard reads hide behind the step
    (docs/training.md#batches-and-the-loader). It changes nothing of what a step gets: the order is the same pure
    arithmetic, and ``state`` is always that of the steps handed out, never of the prefetched ones, so a checkpoint
    resumes exactly once. Memory: ``prefetch`` steps of samples and ``open_shards`` shard streams. ``until``:
    the producer stops after that step (the run's last), reading nothing beyond it.
    """

    def __init__(self, catalog: ShardCatalog, rank: int, world: int, grad_accum: int, seed: int,
                 state: LoaderState | None = None, open_shards: int = 2, prefetch: int = 0,
                 until: int | None = None):
        self.order = SampleOrder(catalog, grad_accum, world, seed)
        self.rank, self.grad_accum = rank, grad_accum
        self.state = self.order.adopt(state) if state is not None else self.order.initial_state()
        self.reader = ShardReader(catalog, open_shards)
        self.until = until
        self._ahead: queue.Queue | None = None
        if prefetch > 0:
            self._ahead = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._producer = threading.Thread(target=self._produce, args=(LoaderState.from_json(self.state.to_json()),),
                                              name=f"loader-prefetch-{rank}", daemon=True)
            self._producer.start()

    def _read(self, state: LoaderState) -> tuple[StepSamples, list[list[dict]]]:
        """Advance ``state`` one step and read this worker's samples of it."""
        step = self.order.next(state)
        mine = [self.reader.sample(s, i) for s, i in step.samples[self.rank]]
        mb = self.order.catalog.buckets[step.bucket].micro_batch
        return step, [mine[k * mb:(k + 1) * mb] for k in range(self.grad_accum)]

    def _produce(self, state: LoaderState) -> None:
        try:
            while not self._stop.is_set() and (self.until is None or state.step < self.until):
                self._put((*self._read(state), state.to_json()))
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():  # a bounded wait, so that close() can always stop the thread
            try:
                return self._ahead.put(item, timeout=0.1)
            except queue.Full:
                continue

    def next(self) -> tuple[StepSamples, list[list[dict]]]:
        if self._ahead is None:
            return self._read(self.state)
        if self.until is not None and self.state.step >= self.until:
            raise RuntimeError(f"the loader was built to stop after step {self.until}")
        item = self._ahead.get()
        if isinstance(item, BaseException):
            raise item
        step, micro_batches, state = item
        self.state = LoaderState.from_json(state)
        return step, micro_batches

    def close(self) -> None:
        """Stop the prefetching thread and close the shard streams."""
        if self._ahead is not None:
            self._stop.set()
            self._producer.join(timeout=30)
        if self._ahead is None or not self._producer.is_alive():
            self.reader.close()
