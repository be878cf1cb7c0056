"""Shard writing (issue "Stages: write"; docs/architecture.md#shards-and-manifest).

``WriteShards`` (a Ray Data stage) turns rows into WebDataset samples and hands them to the ``ShardWriter`` actor that
owns their bucket. A writer streams each bucket into one open tar at a time; after ``samples_per_shard`` samples it
closes the tar and commits it: the tar gets its final name (rename on a filesystem; on S3 the upload itself completes
atomically), then the sidecar ``NNNNNN.json`` is written atomically. The sidecar is the commit record: the manifest is
rebuilt from sidecars only, so an interrupted run leaves no half shard in it, and the sidecar's key list is what a rerun
skips; it also carries the shard's encoder records (``vae`` for latent shards: the image VAE or the mel VAE, by
modality; ``text_encoder`` for shards with text features). At the end of a run ``flush`` commits every bucket's last,
partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import uuid
from typing import Any, NamedTuple

import numpy as np

from models.config_io import from_dict
from models.storage import filesystem
from pipelines import constants as C
from pipelines.buckets import bucket_size, micro_batch_for
from pipelines.config import PrepareConfig
from pipelines.decode import stored_as_is
from pipelines.encode import run_encoders
from pipelines.io import is_local, write_atomic
from pipelines.shards import encoder_json
from pipelines.stage import Stage, meta_of, structured_caption

TENSOR_MEMBERS = {C.AUDIO: C.MEL_MEMBER, C.POINTS: C.POINTS_MEMBER}
FIXED_MTIME = 0  # identical inputs give byte-identical tars


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def image_bytes(image: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        Image.fromarray(image).save(buf, format="WEBP", quality=quality)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def writer_of(modality: str, bucket: str, num_writers: int) -> int:
    """The writer that owns a bucket: a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{modality}/{bucket}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % num_writers


def writer_name(run_id: str, index: int) -> str:
    return f"prepare-writer-{run_id}-{index}"


class _HashingStream:
    """A write-only stream that counts and hashes what passes to the real file (the manifest's bytes and checksum)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


class PackedSample(NamedTuple):
    """One sample as the writer takes it: its tar members already packed (``pack_sample``), its manifest record, and
    whether it carries precomputed text features."""

    data: bytes
    record: dict[str, Any]
    text: bool


def pack_sample(sample: dict[str, bytes]) -> bytes:
    """A sample's WebDataset tar members, as the bytes a tar holds for them: ``KEY.MEMBER`` in sorted order, USTAR
    headers, fixed mtime/owner/mode (the layout ``webdataset.TarWriter`` writes), each member padded to 512 bytes.

    Packed where the sample is made (a task, in parallel), so that a writer actor only appends bytes: its work per
    sample does not grow with the cluster that feeds it (docs/benchmarks.md#curation). Plain ``tarfile`` on purpose:
    importing webdataset imports torch, which costs a process seconds of CPU for nothing."""
    key, parts = sample["__key__"], []
    for name in sorted(k for k in sample if not k.startswith("_")):
        data = sample[name]
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o444
        info.uname = info.gname = "bigdata"  # webdataset's default owner, so earlier shards and these look alike
        parts += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data,
                  tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(parts)


class SampleTar:
    """A tar stream of packed samples (``pack_sample``), closed as ``tarfile`` closes one: two zero blocks, then zeros
    up to a whole 10 KiB record. The bytes are those ``tarfile.open(mode="w|")`` writes for the same members."""

    def __init__(self, stream):
        self.stream, self.offset = stream, 0

    def write(self, packed: bytes) -> None:
        self.stream.write(packed)
        self.offset += len(packed)

    def close(self) -> None:
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        self.stream.write(end + tarfile.NUL * (-(self.offset + len(end)) % tarfile.RECORDSIZE))


class ShardWriter:
    """A Ray actor writing the shards of the buckets it owns (I/O only: samples arrive encoded)."""

    def __init__(self, output: str, s3_options: dict, run_id: str, samples_per_shard: int,
                 next_index: dict[str, int], encoders: dict[str, dict | None] | None = None):
        self.fs, self.root = filesystem(output, s3_options)
        # this run's encoder records ({"vae": …, "audio_vae": …, "text_encoder": …}, pipelines.encode.encoder_records),
        # stamped on the sidecar (→ manifest row) of each shard whose tensors they wrote (encode.run_encoders)
        self.encoders = dict(encoders or {})
        self.local = is_local(self.fs)
        self.run_id = run_id
        self.per_shard = samples_per_shard
        self.next_index = dict(next_index)  # "modality/bucket" → first free shard number
        self.open: dict[str, dict[str, Any]] = {}
        self.committed = 0
        self.samples = 0

    def _start(self, slot: str, info: dict[str, Any]) -> dict[str, Any]:
        index = self.next_index.get(slot, 0)
        self.next_index[slot] = index + 1
        rel = f"{C.SHARDS_DIR}/{slot}/{index:0{C.SHARD_DIGITS}d}{C.SHARD_SUFFIX}"
        final = f"{self.root}/{rel}"
        target = final
        if self.local:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            target = f"{final.rsplit('/', 1)[0]}/.{index:0{C.SHARD_DIGITS}d}.{self.run_id}.tmp"
        f = self.fs.open(target, "wb")
        stream = _HashingStream(f)
        return {"rel": rel, "final": final, "target": target, "file": f, "stream": stream,
                "tar": SampleTar(stream), "records": [], "info": info, "text": True}

    def add_batch(self, slots: dict[str, tuple[dict[str, Any], list[PackedSample]]]) -> int:
        """``add`` for every bucket of one batch: one actor call per batch, however many buckets it spans (a call costs
        both sides more CPU than appending its samples: docs/benchmarks.md#curation). Returns commits."""
        return sum(self.add(slot, info, samples) for slot, (info, samples) in slots.items())

    def add(self, slot: str, info: dict[str, Any], samples: list[PackedSample]) -> int:
        """Append samples of one bucket (``slot`` = "modality/bucket"); commits every full shard. Returns commits."""
        commits = 0
        for sample in samples:
            shard = self.open.get(slot) or self.open.setdefault(slot, self._start(slot, info))
            shard["tar"].write(sample.data)
            shard["records"].append(sample.record)
            shard["text"] = shard["text"] and sample.text
            if len(shard["records"]) >= self.per_shard:
                self._commit(slot)
                commits += 1
        return commits

    def _commit(self, slot: str) -> dict[str, Any]:
        shard = self.open.pop(slot)
        shard["tar"].close()
        shard["file"].close()
        if shard["target"] != shard["final"]:
            self.fs.mv(shard["target"], shard["final"])
        modality, bucket = slot.split("/", 1)
        records = run_encoders(modality, self.encoders)
        vae = records[C.MANIFEST_VAE] if shard["info"].get("member") == C.LATENT_MEMBER else None
        text_encoder = records[C.MANIFEST_TEXT_ENCODER] if shard["text"] else None
        sidecar = {
            "path": shard["rel"], "modality": modality, "bucket": bucket, **shard["info"],
            "samples": len(shard["records"]), "bytes": shard["stream"].size, "sha256": shard["stream"].sha.hexdigest(),
            "run_id": self.run_id, "created": time.time(),
            C.MANIFEST_VAE: encoder_json(vae), C.MANIFEST_TEXT_ENCODER: encoder_json(text_encoder),
            "records": shard["records"],
        }
        sidecar_path = shard["final"][: -len(C.SHARD_SUFFIX)] + C.SIDECAR_SUFFIX
        write_atomic(self.fs, sidecar_path, json.dumps(sidecar).encode())  # the commit point
        self.committed += 1
        self.samples += sidecar["samples"]
        return sidecar

    def flush(self) -> dict[str, int]:
        """Commit every open (partial) shard; returns this writer's totals."""
        for slot in list(self.open):
            self._commit(slot)
        return {"shards": self.committed, "samples": self.samples}


class WriteShards(Stage):
    """Rows → WebDataset samples (tensor member, ``txt``, ``json``, extras), routed to the writer owning each bucket."""

    stage = C.STAGE_WRITE

    def __init__(self, config: dict, run_id: str):
        import ray

        self.config = from_dict(PrepareConfig, config)
        self.writers = [ray.get_actor(writer_name(run_id, i)) for i in range(self.config.write.num_writers)]

    def member_of(self, modality: str) -> str:
        e = self.config.encode
        if modality == C.IMAGE:
            return C.LATENT_MEMBER if e.vae and e.enabled else self.config.write.image_format
        if modality == C.AUDIO and e.audio_vae and e.enabled:
            return C.LATENT_MEMBER
        return TENSOR_MEMBERS[modality]

    def sample_of(self, row: dict[str, Any]) -> PackedSample:
        modality, tensor = row[C.MODALITY], row[C.TENSOR]
        member = self.member_of(modality)
        meta = dict(meta_of(row))
        meta.update(key=str(row[C.KEY]), source=str(row[C.SOURCE]), modality=modality, bucket=str(row[C.BUCKET]),
                    caption_source=str(row[C.CAPTION_SOURCE]) or None, sha256=str(row[C.SHA256]),
                    phash=int(row[C.PHASH]), shape=list(tensor.shape), member=member)
        if modality == C.AUDIO:
            meta[C.STRUCTURED_CAPTION] = structured_caption(meta.get(C.STRUCTURED_CAPTION), str(row[C.CAPTION]))
        w = self.config.write
        original = bytes(row.get(C.DATA, b""))
        if member.endswith(".npy"):
            data = npy_bytes(tensor)
        elif original and w.skip_reencode and stored_as_is(meta, tensor.shape, member):
            data = original  # the source already is this member: storing it again as it is loses nothing
        else:
            data = image_bytes(tensor, member, w.jpeg_quality)
        sample = {"__key__": str(row[C.KEY]), member: data, C.CAPTION_MEMBER: str(row[C.CAPTION]).encode(),
                  C.META_MEMBER: json.dumps(meta, sort_keys=True, default=str).encode()}
        if C.TEXT_FEATURES in row:
            sample[C.TEXT_FEATURES_MEMBER] = npy_bytes(row[C.TEXT_FEATURES])
        if w.keep_original and original:
            sample[f"orig.{meta.get('ext') or 'bin'}"] = original
        record = {"key": str(row[C.KEY]), "source": str(row[C.SOURCE]), "sha256": str(row[C.SHA256]),
                  "phash": int(row[C.PHASH])}
        return PackedSample(pack_sample(sample), record, C.TEXT_FEATURES_MEMBER in sample)

    def process_rows(self, rows):
        import ray

        n = self.config.write.num_writers
        per_writer: dict[int, dict[str, tuple[dict, list]]] = {}  # writer → slot → (info, samples)
        for row in rows:
            modality, bucket = str(row[C.MODALITY]), str(row[C.BUCKET])
            slot = f"{modality}/{bucket}"
            slots = per_writer.setdefault(writer_of(modality, bucket, n), {})
            if slot not in slots:
                tensor = row[C.TENSOR]
                slots[slot] = ({"member": self.member_of(modality), "shape": list(tensor.shape),
                                "dtype": str(tensor.dtype),
                                "micro_batch": micro_batch_for(modality, bucket_size(row), self.config)}, [])
            slots[slot][1].append(self.sample_of(row))
        # back-pressure: the next batch waits for the writers
        ray.get([self.writers[w].add_batch.remote(slots) for w, slots in per_writer.items()])
        # only the keys leave the stage: the payloads are written, nothing downstream needs them
        return [{C.KEY: str(r[C.KEY])} for r in rows], []


def new_writer_id() -> str:
    return uuid.uuid4().hex[:8]
