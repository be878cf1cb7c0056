"""Integration tests of ``jobs.prepare`` against real local services: the session Ray cluster and a moto S3 server.

Issue "Ray Data curation", "Must show": prepare from and to s3:// with shards read back by the webdataset library and by
ray.data.read_webdataset; a corrupted corpus where every bad file lands in rejects with its reason and every good file in
a shard; terminate mid-run and rerun with every sample exactly once; shard tensors shaped as their bucket names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.config_io import ConfigError, from_dict
from models.mel import MelConfig, frames_for
from pipelines import constants as C
from pipelines.config import PrepareConfig
from pipelines.plan import run_prepare
from pipelines.shards import iter_samples, list_shards, read_manifest, read_rejects, shard_encoders, shard_url
from pipelines.sources import key_of
from tests.pipelines_fixtures import (
    make_aesthetic_head,
    make_captioner,
    make_clip,
    make_text_encoder,
    make_vae,
    write_audio,
    write_bad_files,
    write_images,
    write_shapes,
)

REPO = Path(__file__).resolve().parent.parent
# two point buckets: the 256-point default, and 1024 that a 1024-point source fills whole (no subsample)
SMALL = {"bucket": {"image": {"max_patches": 256, "batch_tokens": 1024}, "point_counts": [256, 1024]}, "progress": False}


def config(inputs, output, **sections) -> PrepareConfig:
    data = json.loads(json.dumps(SMALL))
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return from_dict(PrepareConfig, {"inputs": [str(i) for i in inputs], "output": str(output), **data})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every image size and format of the fixtures (the 10th image is a 256x256 JPEG: exactly a bucket), audio at 3 rates
    and 2 formats in the 2 s and 5 s buckets, every 3D kind, and the corrupted files."""
    root = tmp_path_factory.mktemp("corpus")
    good = write_images(root / "img", 10) + write_audio(root / "snd", 4) + write_shapes(root / "3d", 5)
    bad = write_bad_files(root / "bad")
    return root, good, bad


@pytest.fixture(scope="module")
def local_run(ray_cluster, corpus, tmp_path_factory):
    """One job over the whole corrupted corpus (all modalities), shared by the tests that only read its output."""
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("local") / "out"
    # three writers for its many buckets: each bucket belongs to one of them (the default on a small cluster is one)
    cfg = config([root], out, write={"samples_per_shard": 4, "num_writers": 3})
    return cfg, run_prepare(cfg)


def all_samples(output: str) -> list[dict]:
    out = []
    for row in list_shards(output):
        for sample in iter_samples(shard_url(output, row["path"])):
            sample["_shard"] = row
            out.append(sample)
    return out


def check_shapes(output: str, cfg: PrepareConfig) -> None:
    """Every tensor has its shard's shape; image buckets respect the token budget and the aspect limit."""
    for row in list_shards(output):
        samples = list(iter_samples(shard_url(output, row["path"])))
        assert len(samples) == row["samples"] >= 1
        for s in samples:
            assert list(s["tensor"].shape) == row["shape"], (row["path"], s["tensor"].shape)
            assert s["meta"]["bucket"] == row["bucket"]
        if row["modality"] == C.IMAGE:
            h, w = (int(v) for v in row["bucket"].split("x"))
            assert h % 16 == 0 and w % 16 == 0
            assert (h // 16) * (w // 16) <= cfg.bucket.image.max_patches
            assert max(h, w) / min(h, w) <= cfg.bucket.image.max_aspect
            expected = [h, w, 3] if row["member"] in C.IMAGE_FORMATS else [4, h // 8, w // 8]
            assert row["shape"] == expected
        elif row["modality"] == C.AUDIO:
            seconds = float(row["bucket"].rstrip("s"))
            assert row["shape"] == [MelConfig().n_mels, frames_for(round(seconds * C.SAMPLE_RATE))]
        else:
            assert row["shape"] == [int(row["bucket"].removesuffix("pts")), 3]


def test_corrupted_corpus_local(local_run, corpus):
    root, good, bad = corpus
    cfg, stats = local_run
    out = Path(cfg.output)

    rejects = read_rejects(str(out)).to_pylist()
    by_name = {Path(r["source"]).name: r for r in rejects}
    for name, reason in bad.items():
        assert name in by_name, f"{name} missing from rejects"
        assert by_name[name]["reason"] == reason, (name, by_name[name])
        assert by_name[name]["stage"] == C.STAGE_DECODE
    assert len(rejects) == len(bad)  # no good file rejected

    samples = all_samples(str(out))
    assert sorted(s["meta"]["source"] for s in samples) == sorted(str(p) for p in good)
    assert len({s["key"] for s in samples}) == len(samples)
    check_shapes(str(out), cfg)
    # captions from sidecars, with their source recorded
    by_source = {s["meta"]["source"]: s for s in samples}
    assert by_source[str(root / "img" / "img_0_000.jpg")]["caption"] == "a photo number 0"
    assert by_source[str(root / "img" / "img_0_001.png")]["caption"] == "a drawing number 1"
    assert by_source[str(root / "img" / "img_0_001.png")]["meta"]["caption_source"] == C.CAPTION_FROM_SIDECAR
    # points normalised to the unit sphere (a subsample need not keep the farthest point, a full set does)
    radii = [np.linalg.norm(s["tensor"], axis=1).max() for s in samples if s["meta"]["modality"] == C.POINTS]
    assert max(radii) <= 1 + 1e-5 and min(abs(r - 1) for r in radii) < 1e-3
    # a source that already is its bucket's image (a 256x256 RGB JPEG) is stored as it is, not decoded and re-encoded;
    # one of the same size in another format is encoded to the output format
    raw = {s["key"]: s for row in list_shards(str(out), modality=C.IMAGE)
           for s in iter_samples(shard_url(str(out), row["path"]), decode=False)}
    jpeg, webp = root / "img" / "img_0_009.jpg", root / "img" / "img_0_002.webp"
    assert by_source[str(jpeg)]["meta"]["bucket"] == by_source[str(webp)]["meta"]["bucket"] == "256x256"
    assert raw[key_of(str(jpeg))]["jpg"] == jpeg.read_bytes()
    assert raw[key_of(str(webp))]["jpg"][:2] == b"\xff\xd8"  # a JPEG now
    # stats: counts per stage and reason, throughput
    assert stats["run"]["written_samples"] == len(good) and stats["run"]["writers"] == 3
    assert stats["run"]["stages"]["decode"]["rejected"]["nan"] == 1
    saved = json.loads((out / C.STATS_FILE).read_text())
    assert saved["total"]["samples"] == len(good) and saved["total"]["rejected"] == len(bad)
    # no VAE, no text encoder: the records say so
    assert saved[C.STATS_ENCODERS] == {C.MANIFEST_VAE: None, C.AUDIO_VAE: None, C.MANIFEST_TEXT_ENCODER: None}
    assert all(r[C.MANIFEST_VAE] is None and r[C.MANIFEST_TEXT_ENCODER] is None
               for r in read_manifest(str(out)).to_pylist())

    # a rerun finds everything done and writes nothing
    again = run_prepare(cfg)
    assert again["run"]["written_samples"] == 0
    assert again["run"]["stages"]["read"]["skipped_done"] == len(good) + len(bad)
    assert len(all_samples(str(out))) == len(good)
    assert read_rejects(str(out)).num_rows == len(bad)


def test_shards_readable_by_webdataset_and_ray(local_run, corpus):
    import ray
    import webdataset as wds

    _, good, _ = corpus
    cfg, _ = local_run
    out = Path(cfg.output)
    images = sum(1 for p in good if p.parent.name == "img")
    n = 0
    for row in list_shards(str(out), modality=C.IMAGE):
        for sample in wds.WebDataset(str(out / row["path"]), shardshuffle=False).decode("rgb8"):
            assert sample["jpg"].shape == tuple(row["shape"])
            n += 1
    assert n == images
    ds = ray.data.read_webdataset(str(out / C.SHARDS_DIR / C.IMAGE), decoder=False, file_extensions=["tar"])
    assert ds.count() == images


def test_s3_to_s3(ray_cluster, corpus, s3_bucket, s3_server):
    import boto3
    import ray
    from pyarrow import fs as pafs

    from models.storage import filesystem
    from pipelines.io import resolve_storage

    root, _, _ = corpus
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    uploaded = 0
    for path in sorted((root / "img").iterdir())[:8] + sorted((root / "snd").iterdir())[:4]:
        s3.upload_file(str(path), s3_bucket, f"raw/{path.parent.name}/{path.name}")
        uploaded += path.suffix not in (".txt", ".json")
    out = f"s3://{s3_bucket}/prepared"
    cfg = config([f"s3://{s3_bucket}/raw/img/*", f"s3://{s3_bucket}/raw/snd"], out, write={"samples_per_shard": 3})
    stats = run_prepare(cfg)
    assert stats["run"]["written_samples"] == uploaded
    check_shapes(out, cfg)
    samples = all_samples(out)
    assert all(s["meta"]["source"].startswith(f"s3://{s3_bucket}/raw/") for s in samples)
    assert any(s["caption"] for s in samples)  # sidecars found on S3 too

    # the webdataset library through fsspec file objects (it has no s3:// handler of its own)
    from webdataset.tariterators import group_by_keys, tar_file_expander

    fs, _ = filesystem(out, resolve_storage(out))
    n = 0
    for row in list_shards(out):
        with fs.open(f"{s3_bucket}/prepared/{row['path']}", "rb") as f:
            samples = list(group_by_keys(tar_file_expander([{"stream": f, "url": row["path"]}])))
        assert len(samples) == row["samples"]
        assert all({row["member"], "txt", "json"} <= set(x) for x in samples)
        n += len(samples)
    assert n == uploaded

    # ray.data.read_webdataset through pyarrow's S3 filesystem (docs/architecture.md#stack-pitfalls)
    s3fs_arrow = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1")
    ds = ray.data.read_webdataset(f"{s3_bucket}/prepared/{C.SHARDS_DIR}", filesystem=s3fs_arrow, decoder=False,
                                  file_extensions=["tar"])
    assert ds.count() == uploaded


def test_kill_and_resume_exactly_once(ray_cluster, tmp_path):
    import ray

    root = tmp_path / "corpus"
    good = write_images(root, 24, seed=3)
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "jobs.prepare", "--input", str(root), "--output", str(out),
            "--set", "bucket.image.max_patches=256", "--set", "write.samples_per_shard=2",
            "--set", "decode.resources.batch_size=1", "--set", "progress=false", "--log-level", "WARNING"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shards/*/*/*.json")):
        assert proc.poll() is None, "the first run ended before any shard was committed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # terminate mid-run: no cleanup, no flush
    proc.wait()
    committed_before = list(out.glob("shards/*/*/*.json"))
    assert committed_before and not (out / C.STATS_FILE).exists(), "the first run was not interrupted mid-way"

    stats = run_prepare(config([root], out, write={"samples_per_shard": 2}))
    assert stats["run"]["stages"]["read"]["skipped_done"] >= 2
    samples = all_samples(str(out))
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) == len(good)  # every sample exactly once
    assert sorted(s["meta"]["source"] for s in samples) == sorted(str(p) for p in good)
    assert not list(out.glob("shards/**/.*.tmp"))
    manifest_paths = {r["path"] for r in list_shards(str(out))}
    assert manifest_paths == {str(p.relative_to(out)) for p in out.glob("shards/*/*/*.tar")}


def test_model_stages_with_list_and_tar_inputs(ray_cluster, corpus, tmp_path):
    """Captioner, CLIP + aesthetic scores, VAE latents and text features: tiny random models loaded by path."""
    import webdataset as wds

    root, _, _ = corpus
    models = tmp_path / "models"
    media = sorted(p for p in (root / "img").iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    paths = media[:6]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"path": str(p), "caption": "a photo of the dog" if i % 2 else None,
                                           "license": "cc0"}) + "\n" for i, p in enumerate(paths)))
    tar = tmp_path / "existing.tar"
    with wds.TarWriter(str(tar)) as w:
        for i, p in enumerate(media[-3:] + [paths[0]]):  # the last one repeats a listed file: an exact duplicate
            w.write({"__key__": f"old{i}", p.suffix[1:]: p.read_bytes(), "txt": "a red chair"})
        w.write({"__key__": "oldmesh", "off": (root / "3d" / "shape_0_001.off").read_bytes()})
    cfg = config(
        [listing, tar], tmp_path / "out",
        caption={"model": make_captioner(models / "cap")},
        filter={"clip_model": make_clip(models / "clip"), "aesthetic_model": make_aesthetic_head(models / "aes.safetensors"),
                "min_clip_score": -1.0},
        encode={"vae": make_vae(models / "vae"), "text_encoder": make_text_encoder(models / "te")},
        write={"samples_per_shard": 4},
    )
    stats = run_prepare(cfg)
    samples = all_samples(cfg.output)
    assert stats["run"]["written_samples"] == len(samples) == 6 + 3 + 1
    # fixed pools of one actor: caption + scores share one for images, the 3D captioner has its own
    assert stats["run"]["stages"][C.STAGE_SCORE]["processes"] == 1
    assert stats["run"]["stages"][C.STAGE_CAPTION]["processes"] == 2
    [dup] = read_rejects(cfg.output).to_pylist()
    assert dup["reason"] == C.Reason.DUPLICATE and dup["stage"] == C.STAGE_DEDUP
    check_shapes(cfg.output, cfg)
    for s in samples:
        meta = s["meta"]
        if meta["modality"] == C.IMAGE:
            assert s["tensor"].dtype == np.float16 and s["tensor"].shape[0] == 4  # VAE latents
            assert "clip" in meta["scores"] and "aesthetic" in meta["scores"]
            assert meta["latent"]["mode"] == "sample"
        assert s["caption"].strip()
        assert meta["caption_source"] in (C.CAPTION_FROM_LIST, C.CAPTION_FROM_TAR, C.CAPTION_FROM_MODEL)
        assert s["text_features"].shape[1] == 16 and s["text_features"].shape[0] >= 1
    sources = {s["meta"]["caption_source"] for s in samples}
    assert sources == {C.CAPTION_FROM_LIST, C.CAPTION_FROM_TAR, C.CAPTION_FROM_MODEL}
    # precomputed features are what the trainer's and the sampler's TextEncoder computes online (fp16 storage)
    from models.text_encoder import TextEncoder

    encoder = TextEncoder.from_pretrained(cfg.encode.text_encoder, kind="decoder", layer=-2)
    for s in samples[:3]:
        feats, mask = encoder.encode([s["caption"]])
        online = feats[0][mask[0]].numpy()
        assert s["text_features"].shape == online.shape
        np.testing.assert_allclose(s["text_features"].astype(np.float32), online, atol=2e-3, rtol=2e-3)
    # … and beside the shards, the empty prompt's features for caption dropout (the trainer needs no text encoder)
    from pipelines.shards import read_null_text

    feats, mask = encoder.encode([""])
    np.testing.assert_allclose(read_null_text(cfg.output).astype(np.float32), feats[0][mask[0]].numpy(),
                               atol=2e-3, rtol=2e-3)
    mesh = next(s for s in samples if s["meta"]["modality"] == C.POINTS)
    assert mesh["meta"]["caption_source"] == C.CAPTION_FROM_MODEL  # captioned from rendered views
    assert next(s for s in samples if s["meta"]["source"] == str(paths[0]))["meta"]["license"] == "cc0"

    # the encoders are recorded: the tiny VAE's scale (diffusers' default, in its config.json) and 4 channels, the tiny
    # text encoder's width 16 and the settings it ran with — on every manifest row and in stats.json
    vae = {"path": cfg.encode.vae, "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": 4}
    text = {"path": cfg.encode.text_encoder, "kind": "decoder", "layer": -2, "max_length": 256,
            "pad_to_multiple_of": 8, "hidden_size": 16}
    rows = read_manifest(cfg.output).to_pylist()
    assert {r["modality"] for r in rows} == {C.IMAGE, C.POINTS}
    for row in rows:
        assert row[C.MANIFEST_VAE] == (json.dumps(vae, sort_keys=True) if row["modality"] == C.IMAGE else None)
        assert row[C.MANIFEST_TEXT_ENCODER] == json.dumps(text, sort_keys=True)
    saved = json.loads((Path(cfg.output) / C.STATS_FILE).read_text())
    assert stats[C.STATS_ENCODERS] == saved[C.STATS_ENCODERS] == {C.MANIFEST_VAE: vae, C.AUDIO_VAE: None,
                                                                  C.MANIFEST_TEXT_ENCODER: text}
    assert shard_encoders([r for r in rows if r["modality"] == C.IMAGE]) == {C.MANIFEST_VAE: vae,
                                                                             C.MANIFEST_TEXT_ENCODER: text}
    assert shard_encoders([r for r in rows if r["modality"] == C.POINTS]) == {C.MANIFEST_VAE: None,
                                                                              C.MANIFEST_TEXT_ENCODER: text}
    # a rerun with another VAE, scale or text setting (or none) fails at the start, before touching the output
    other_vae = make_vae(models / "vae2")
    before = sorted(p.name for p in Path(cfg.output).rglob("*"))
    for change, message in (({"vae": other_vae}, other_vae), ({"vae_scaling_factor": 0.5}, '"scaling_factor": 0.5'),
                            ({"vae": None}, "would store images"), ({"text_max_length": 128}, '"max_length": 128'),
                            ({"text_encoder": None}, "no encode.text_encoder")):
        rerun = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, **change))
        with pytest.raises(ConfigError, match="holds image shards") as err:
            run_prepare(rerun)
        assert message in str(err.value) and "new --output" in str(err.value), str(err.value)
    assert sorted(p.name for p in Path(cfg.output).rglob("*")) == before


def test_model_stage_pool_grows_under_load(ray_cluster, tmp_path):
    """encode.vae_resources.max_concurrency: the VAE pool starts with one actor and Ray Data's actor autoscaler starts
    a second one while batches queue up for the first; stats.json counts the actors the pool started."""
    good = write_images(tmp_path / "img", 96, seed=5, sizes=[(256, 256), (320, 240)])
    # one image per batch: the 96 batches queue up while the first actor imports torch and diffusers, so as soon as it
    # runs it has 2 in flight (Ray Data's default max_tasks_in_flight_per_actor), a utilisation of 2 above the
    # upscaling threshold (1.75 in Ray 2.60), and the pool starts its second actor. That one counts itself before it
    # loads the VAE, seconds later; the first actor alone takes several times as long over the queue, on an idle or a
    # loaded machine alike (both are CPU-bound), so the count is in before the input runs out.
    # 0.25 CPU per actor: both fit in the operator's share of the session cluster's 4 logical CPUs next to the decode
    # and write tasks, so the resource budget never holds the second one back.
    resources = {"num_cpus": 0.25, "concurrency": 1, "max_concurrency": 2, "batch_size": 1}
    cfg = config([tmp_path / "img"], tmp_path / "out", read={"modalities": [C.IMAGE]},
                 decode={"resources": {"batch_size": 1}}, encode={"vae": make_vae(tmp_path / "vae"),
                                                                  "vae_resources": resources})
    stats = run_prepare(cfg)
    assert stats["run"]["written_samples"] == len(good)
    encode = json.loads((Path(cfg.output) / C.STATS_FILE).read_text())["run"]["stages"][C.STAGE_ENCODE]
    assert encode["processes"] == 2, encode
    assert encode["in"] == encode["out"] == len(good)


def test_labels_from_a_list_column_keep_their_indices_across_runs(ray_cluster, tmp_path):
    """read.label_from=column: names in natural order become indices in every sample's json and labels.json; a row
    without a label is a no_label reject; a rerun with a new class appends it and leaves written indices as they were;
    a rerun with another label source is refused before anything is written."""
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    rng = np.random.default_rng(0)
    labels = ["10", "2", "chair", None, "2"]
    for i in range(len(labels) + 1):
        np.save(clouds / f"c{i}.npy", rng.normal(size=(300, 3)).astype(np.float32))
    rows = [{"path": f"clouds/c{i}.npy", "category": label} for i, label in enumerate(labels)]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    read = {"modalities": ["points"], "label_from": "column", "label_column": "category"}
    stats = run_prepare(config([listing], out, read=read))
    assert stats["labels"] == {"from": "the list column 'category'", "classes": 3}
    [reject] = read_rejects(str(out)).to_pylist()
    assert reject["reason"] == C.Reason.NO_LABEL and reject["source"].endswith("c3.npy")
    assert "no 'category' value" in reject["message"]
    first = {s["meta"]["source"]: s["meta"][C.LABEL] for s in all_samples(str(out))}
    assert sorted(first.values()) == [0, 0, 1, 2]  # "2" < "10" < "chair"

    listing.write_text(listing.read_text() + json.dumps({"path": "clouds/c5.npy", "category": "bench"}) + "\n")
    run_prepare(config([listing], out, read=read))
    assert json.loads((out / C.LABELS_FILE).read_text())["class_names"] == ["2", "10", "chair", "bench"]
    samples = {s["meta"]["source"]: s["meta"] for s in all_samples(str(out))}
    assert {k: v[C.LABEL] for k, v in samples.items() if k in first} == first
    assert samples[str(clouds / "c5.npy")][C.LABEL] == 3 and samples[str(clouds / "c5.npy")][C.LABEL_NAME] == "bench"

    for changed, message in (({"label_from": "folder"}, "labelled by the list column 'category'"),
                             ({"label_from": "none"}, "this run's labels are none")):
        with pytest.raises(ConfigError, match=message):
            run_prepare(config([listing], out, read={**read, **changed}))
