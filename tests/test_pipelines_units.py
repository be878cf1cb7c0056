"""Fast unit tests of the curation building blocks (no Ray): buckets, decoders, dedup, sources, config, scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.config_io import ConfigError, from_dict, resolve_config, to_dict
from models.mel import MelConfig
from pipelines import constants as C
from pipelines.buckets import best_image_bucket, bucket_table, image_bucket_sizes, mel_frames, resize_to_bucket
from pipelines.config import PrepareConfig
from pipelines.decode import decode_audio, decode_points, decode_to_bucket
from pipelines.encode import log_mel
from pipelines.filters import DedupIndex
from pipelines.sources import expand_tar, key_of, list_inputs
from pipelines.stage import Reject, meta_of
from tests.pipelines_fixtures import BAD_FILES, make_image, write_bad_files, write_images


def test_image_buckets_respect_budget_and_aspect():
    sizes = image_bucket_sizes(4096, 4.0)
    assert (1024, 1024) in sizes and (512, 2048) in sizes and (2048, 512) in sizes
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0
        assert (h // 16) * (w // 16) <= 4096
        assert max(h, w) / min(h, w) <= 4.0
    assert [w for _, w in sizes] == sorted((w for _, w in sizes), reverse=True)  # official order


def test_best_bucket_is_deterministic_best_fit():
    sizes = image_bucket_sizes(256, 4.0)
    assert best_image_bucket(500, 500, sizes) == (256, 256)
    h, w = best_image_bucket(800, 400, sizes)
    assert w > h and abs(w / h - 2) < 0.2
    assert best_image_bucket(801, 403, sizes) == best_image_bucket(801, 403, sizes)
    out = resize_to_bucket(make_image(np.random.default_rng(0), 801, 403), (h, w))
    assert out.shape == (h, w, 3)


def test_fit_to_bucket_equals_resize_then_crop():
    """The one-pass resize of the crop region gives the pixels of the official recipe (resize the whole image to cover
    the bucket, then centre-crop) up to rounding."""
    from PIL import Image

    from pipelines.buckets import cover_size, fit_to_bucket

    rng = np.random.default_rng(0)
    sizes = image_bucket_sizes(256, 4.0)
    for w, h in [(801, 403), (300, 700), (1200, 333), (64, 40), (257, 256)]:
        img = Image.fromarray(make_image(rng, w, h))
        h_b, w_b = best_image_bucket(w, h, sizes)
        cw, ch = cover_size(w, h, (h_b, w_b))
        left, top = (cw - w_b) // 2, (ch - h_b) // 2
        reference = img.resize((cw, ch), Image.Resampling.BICUBIC, reducing_gap=2.0)
        reference = np.asarray(reference.crop((left, top, left + w_b, top + h_b)), np.int16)
        ours = np.asarray(fit_to_bucket(img, (h_b, w_b)), np.int16)
        assert ours.shape == reference.shape == (h_b, w_b, 3)
        assert np.abs(ours - reference).max() <= 1


def test_bucket_table_and_micro_batches():
    cfg = PrepareConfig()
    table = bucket_table(cfg)
    square = next(b for b in table if b.name == "1024x1024")
    assert square.micro_batch == cfg.bucket.image.batch_tokens // 4096
    assert {b.modality for b in table} == set(C.MODALITIES)


def test_corrupted_files_get_their_reasons(tmp_path):
    write_bad_files(tmp_path)
    cfg = PrepareConfig()
    sizes = image_bucket_sizes(256, 4.0)
    for name, reason in BAD_FILES.items():
        data = (tmp_path / name).read_bytes()
        ext = name.rsplit(".", 1)[1]
        with pytest.raises(Reject) as info:
            if ext in C.IMAGE_EXTENSIONS:
                decode_to_bucket(data, cfg.decode.image, sizes)
            elif ext in C.AUDIO_EXTENSIONS:
                decode_audio(data, cfg.decode.audio)
            else:
                decode_points(data, ext, cfg.decode.points, seed=0)
        assert info.value.reason == reason, name


def test_audio_resampled_to_16k_mono_and_mel_shape():
    from tests.pipelines_fixtures import wav_bytes

    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 220 * t)], 1).astype(np.float32) * 0.3
    wave, info = decode_audio(wav_bytes(stereo, 44100), PrepareConfig().decode.audio)
    assert wave.ndim == 1 and abs(len(wave) - 32000) <= 1 and info["channels"] == 2
    mel = log_mel(wave[:32000])
    assert mel.shape == (MelConfig().n_mels, mel_frames(32000)) and np.isfinite(mel).all()


def test_mesh_sampling_on_unit_sphere():
    from tests.pipelines_fixtures import cube_obj

    pts, info = decode_points(cube_obj(2.0).encode(), "obj", PrepareConfig().decode.points, seed=1)
    assert pts.shape == (4096, 3) and info["kind"] == "mesh"
    assert abs(np.linalg.norm(pts, axis=1).max() - 1) < 1e-5
    again, _ = decode_points(cube_obj(2.0).encode(), "obj", PrepareConfig().decode.points, seed=1)
    assert np.array_equal(pts, again)  # seeded by key: reruns agree


def test_dedup_index_exact_and_near():
    index = DedupIndex(max_distance=2)
    index.seed([("k0", "sha0", 0b1111)])
    verdicts = index.check([("k1", "sha0", 0), ("k2", "sha2", 0b1101), ("k3", "sha3", -5), ("k3", "sha3", -5)],
                           exact=True, perceptual=True)
    assert verdicts[0] == (C.Reason.DUPLICATE, "k0")
    assert verdicts[1] == (C.Reason.NEAR_DUPLICATE, "k0")  # one bit away
    assert verdicts[2] is None and verdicts[3] is None  # the same key asking twice is not its own duplicate


def test_sources_folder_sidecars_lists_and_tars(tmp_path):
    import webdataset as wds

    paths = write_images(tmp_path / "img", 4)
    (tmp_path / "list.csv").write_text("path,caption,score\n" + f"img/{paths[2].name},a red cat,0.5\n")
    with wds.TarWriter(str(tmp_path / "t.tar")) as w:
        w.write({"__key__": "a", "jpg": paths[0].read_bytes(), "txt": "from tar", "json": json.dumps({"x": 1})})
    items, tars = list_inputs([str(tmp_path / "img"), str(tmp_path / "list.csv"), str(tmp_path / "*.tar")])
    by_source = {i[C.SOURCE]: i for i in items}
    assert by_source[str(paths[0])][C.CAPTION_URI].endswith(".txt")
    assert by_source[str(paths[1])][C.CAPTION_URI].endswith(".json")
    listed = [i for i in items if i[C.CAPTION_SOURCE] == C.CAPTION_FROM_LIST]
    assert listed[0][C.CAPTION] == "a red cat" and json.loads(listed[0][C.META]) == {"score": 0.5}
    assert listed[0][C.KEY] == key_of(str(paths[2]))
    [tar_item] = expand_tar(tars[0], {})
    assert tar_item[C.CAPTION] == "from tar" and tar_item[C.OFFSET] > 0
    data = (tmp_path / "t.tar").read_bytes()[tar_item[C.OFFSET]:tar_item[C.OFFSET] + tar_item[C.LENGTH]]
    assert data == paths[0].read_bytes()


def test_config_is_strict_and_round_trips(tmp_path):
    cfg = resolve_config(PrepareConfig, overrides=["inputs=[a]", "output=b", "bucket.image.max_patches=256"])
    assert from_dict(PrepareConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        resolve_config(PrepareConfig, overrides=["filter.no_such_rule=1"])
    with pytest.raises(ConfigError):
        resolve_config(PrepareConfig, overrides=["write.samples_per_shard=many"])
    with pytest.raises(ConfigError):
        PrepareConfig(inputs=["a"], output="b", filter=from_dict(PrepareConfig, {}).filter.__class__(
            aesthetic_model="x")).validate()
    with pytest.raises(ConfigError, match="encode.vae_dtype"):
        resolve_config(PrepareConfig, overrides=["inputs=[a]", "output=b", "encode.vae_dtype=float64"]).validate()


def test_score_filter_thresholds(tmp_path):
    from pipelines.scores import ScoreFilter
    from tests.pipelines_fixtures import make_aesthetic_head, make_clip

    cfg = PrepareConfig(inputs=["a"], output="b")
    cfg.filter.clip_model = make_clip(tmp_path / "clip")
    cfg.filter.aesthetic_model = make_aesthetic_head(tmp_path / "aes.safetensors")
    cfg.filter.min_clip_score = 2.0  # cosine similarity never reaches 2: every captioned sample fails
    rng = np.random.default_rng(0)
    rows = [{C.KEY: f"{i:016x}", C.SOURCE: f"s{i}", C.MODALITY: C.IMAGE, C.CAPTION: cap, C.META: "{}",
             C.PAYLOAD: make_image(rng, 48, 40)} for i, cap in enumerate(["a photo of the cat", ""])]
    stage = ScoreFilter(to_dict(cfg), C.IMAGE)
    out, rejects = stage.process_rows(rows)
    assert [r["reason"] for r in rejects] == [C.Reason.LOW_CLIP_SCORE]
    kept = meta_of(out[0])  # parsed in place by the stage (a chain serialises it once, when the batch leaves)
    assert "aesthetic" in kept["scores"] and "clip" not in kept["scores"]  # no caption, no similarity


def audio_rows(captions: list[str], seconds: list[float]) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i, (caption, length) in enumerate(zip(captions, seconds)):
        t = np.arange(int(length * C.SAMPLE_RATE)) / C.SAMPLE_RATE
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t) + 0.02 * rng.normal(size=t.shape)
        rows.append({C.KEY: f"{i:016x}", C.SOURCE: f"s{i}.wav", C.MODALITY: C.AUDIO, C.CAPTION: caption,
                     C.CAPTION_SOURCE: "sidecar" if caption else "", C.META: "{}", C.PAYLOAD: wave.astype(np.float32)})
    return rows


def test_clap_score_filter_audio(tmp_path):
    """CLAP text–audio similarity: 16 kHz clips resampled to the model's rate, clips longer and shorter than its window,
    a caption longer than the tokenizer's limit; a threshold rejects with its reason, no caption means no score."""
    from pipelines.scores import ScoreFilter
    from tests.pipelines_fixtures import make_clap

    cfg = PrepareConfig(inputs=["a"], output="b")
    cfg.filter.clap_model = make_clap(tmp_path / "clap")
    stage = ScoreFilter(to_dict(cfg), C.AUDIO)
    long_caption = " ".join(["a loud music tone"] * 20)  # 80 words, more than the 30 tokens the tokenizer allows
    rows = audio_rows(["a tone", long_caption, ""], [0.6, 3.0, 1.5])
    kept, rejects = stage.process_rows([dict(r) for r in rows])
    assert not rejects and len(kept) == 3  # no threshold: scores are only recorded
    scores = [r[C.META]["scores"] for r in kept]
    assert all(-1.0 <= s["clap"] <= 1.0 for s in scores[:2]) and "clap" not in scores[2]

    stage.cfg.min_clap_score = 2.0  # cosine similarity never reaches 2: every captioned clip fails
    kept, rejects = stage.process_rows([dict(r) for r in rows])
    assert [r["reason"] for r in rejects] == [C.Reason.LOW_CLAP_SCORE] * 2
    assert [r[C.KEY] for r in kept] == [rows[2][C.KEY]]


def test_audio_captioner(tmp_path):
    """A speech-to-text model (tiny Whisper) captions the clips without one; with recaption it replaces existing
    captions and keeps the old one in the metadata; require_caption rejects what stays empty."""
    from pipelines.caption import Captioner
    from tests.pipelines_fixtures import make_audio_captioner

    cfg = PrepareConfig(inputs=["a"], output="b")
    cfg.caption.audio_model = make_audio_captioner(tmp_path / "whisper")
    cfg.caption.max_new_tokens = 6
    stage = Captioner(to_dict(cfg), C.AUDIO)
    rows = audio_rows(["a tone number 3", ""], [3.0, 0.8])  # longer and shorter than the model's 2 s window
    kept, rejects = stage.process_rows([dict(r) for r in rows])
    assert not rejects
    assert kept[0][C.CAPTION] == "a tone number 3" and kept[0][C.CAPTION_SOURCE] == "sidecar"
    assert kept[1][C.CAPTION].strip() and kept[1][C.CAPTION_SOURCE] == C.CAPTION_FROM_MODEL
    assert kept[1][C.META]["caption_model"] == cfg.caption.audio_model

    stage.cfg.recaption = True
    kept, _ = stage.process_rows([dict(r) for r in rows])
    assert all(r[C.CAPTION_SOURCE] == C.CAPTION_FROM_MODEL for r in kept)
    assert kept[0][C.META]["original_caption"] == "a tone number 3"

    stage.cfg.recaption, stage.cfg.require_caption = False, True
    stage.generate = lambda inputs: [""] * len(inputs)  # a model that says nothing
    kept, rejects = stage.process_rows([dict(r) for r in rows])
    assert [r[C.KEY] for r in kept] == [rows[0][C.KEY]]
    assert [r["reason"] for r in rejects] == [C.Reason.NO_CAPTION]


def test_rayjob_entrypoint_resolves_with_dry_run(capsys):
    """The RayJob manifest's flags are real config keys: its entrypoint runs with --dry-run and the plan puts the VAE
    stage on a GPU with the `encode_gpu` custom resource the encode-gpu node group advertises."""
    import shlex

    import yaml

    from jobs.prepare import main
    from tests.conftest import REPO_ROOT

    manifest = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "rayjob-prepare.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.prepare"]
    assert main(argv[3:] + ["--dry-run"]) == 0
    vae_line = next(line for line in capsys.readouterr().out.splitlines() if "VaeEncode" in line)
    assert "gpus=1.0" in vae_line and "encode_gpu=1" in vae_line
    assert "cpus=0.5" in vae_line  # the section's other defaults survive the override
    # the pool grows from one actor to one per encode-gpu node (raycluster.yaml's maxReplicas)
    cluster = yaml.safe_load((REPO_ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())
    [group] = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "encode-gpu"]
    assert f"actors×1..{group['maxReplicas']}" in vae_line


def test_max_concurrency_grows_model_stage_pools_only():
    """Resources.max_concurrency: an actor pool from concurrency up to max_concurrency (printed actors×1..8), checked
    by validate() with the key named; refused on task stages; stats.json keeps each stage's process count."""
    import pyarrow as pa

    from pipelines.config import STAGE_RESOURCES, Resources
    from pipelines.plan import apply_operator, build_plan, describe, make_stats, operators, pool_size

    models = {"caption": {"model": "cap"}, "filter": {"clip_model": "clip"},
              "encode": {"vae": "vae", "text_encoder": "te", "text_encoder_kind": "t5"}}
    cfg = from_dict(PrepareConfig, {"inputs": ["a"], "output": "b", "read": {"modalities": [C.IMAGE, C.POINTS]},
                                    **models})
    # every stage's resources key says rightly whether build_plan runs it in an actor pool
    plan = build_plan(cfg, {}, encoders={C.AUDIO_VAE: None})
    by_id = {id(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])): key for key in STAGE_RESOURCES}
    seen = {by_id[id(spec.resources)]: spec.actor for specs in plan.stages.values() for spec in specs}
    assert seen == {k: v for k, v in STAGE_RESOURCES.items() if k != "encode.audio_vae_resources"}

    cfg.encode.vae_resources.max_concurrency = 8
    cfg.validate()
    assert pool_size(Resources(concurrency=2, max_concurrency=2)) == (2, 2)  # = concurrency: a fixed pool
    groups = [g for g in operators(build_plan(cfg, {}, encoders={C.AUDIO_VAE: None}).stages[C.IMAGE]) if g[0].actor]
    assert [describe(g).split(": ")[1].split(",")[0] for g in groups] == ["actors×1", "actors×1..8", "actors×1"]

    class Dataset:
        def map_batches(self, fn, **kwargs):
            self.compute = kwargs["compute"]
            return self

    pools = [apply_operator(Dataset(), g, "run", C.IMAGE, 1000, 2.0).compute for g in groups]
    assert [(p.min_size, p.max_size) for p in pools] == [(1, 1), (1, 8), (1, 1)]

    for key, value, message in (("encode.vae_resources", -1, "must be >= 0"),
                                ("filter.resources", 1, "below concurrency=2"),
                                ("decode.resources", 4, "is for model stages"),
                                ("write.resources", 2, "is for model stages")):
        bad = from_dict(PrepareConfig, to_dict(cfg))
        resources = getattr(getattr(bad, key.split(".")[0]), key.split(".")[1])
        resources.max_concurrency, resources.concurrency = value, 2 if key == "filter.resources" else 0
        with pytest.raises(ConfigError, match=f"{key}.max_concurrency") as err:
            bad.validate()
        assert message in str(err.value), str(err.value)

    snapshot = {"counts": {C.STAGE_ENCODE: {"in": 4, "out": 4, "seconds": 1.0, "processes": 3}}, "reasons": {}}
    manifest = pa.table({"samples": pa.array([], pa.int64())})
    rejects = pa.table({"stage": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    stats = make_stats("run", snapshot, [], manifest, rejects, 1.0, 1.0)
    assert stats["run"]["stages"][C.STAGE_ENCODE]["processes"] == 3


# ---- encoder records ----------------------------------------------------------------------------------------------
VAE_A = {"path": "s3://models/vae", "scaling_factor": 0.13025, "shift_factor": 0.0, "latent_channels": 4}
TEXT_A = {"path": "s3://models/gemma", "kind": "decoder", "layer": -2, "max_length": 256, "pad_to_multiple_of": 8,
          "hidden_size": 2048}


def manifest_row(index: int, vae=None, text=None, modality=C.IMAGE, member=C.LATENT_MEMBER, **extra) -> dict:
    from pipelines.shards import encoder_json

    row = {"path": f"shards/{modality}/256x256/{index:06d}.tar", "modality": modality, "bucket": "256x256",
           "member": member, C.MANIFEST_VAE: encoder_json(vae), C.MANIFEST_TEXT_ENCODER: encoder_json(text)}
    row.update(extra)
    return row


def test_shard_encoders_agree_or_name_two_shards():
    from pipelines.shards import shard_encoders

    rows = [manifest_row(i, VAE_A, TEXT_A) for i in range(3)]
    assert rows[0][C.MANIFEST_VAE] == json.dumps(VAE_A, sort_keys=True)
    assert shard_encoders(rows) == {C.MANIFEST_VAE: VAE_A, C.MANIFEST_TEXT_ENCODER: TEXT_A}
    assert shard_encoders([]) == {C.MANIFEST_VAE: None, C.MANIFEST_TEXT_ENCODER: None}
    # a manifest of an older prepare: no columns at all → unknown (None), not an error
    old = [{k: v for k, v in manifest_row(i).items() if k not in C.ENCODER_COLUMNS} for i in range(2)]
    assert shard_encoders(old) == {C.MANIFEST_VAE: None, C.MANIFEST_TEXT_ENCODER: None}
    # images stored as images and audio shards carry no VAE; image shards may sit beside latent shards
    audio = [manifest_row(i, None, TEXT_A, modality=C.AUDIO, member=C.MEL_MEMBER) for i in range(2)]
    assert shard_encoders(audio) == {C.MANIFEST_VAE: None, C.MANIFEST_TEXT_ENCODER: TEXT_A}
    assert shard_encoders(rows + [manifest_row(9, None, TEXT_A, member="jpg")])[C.MANIFEST_VAE] == VAE_A

    def fails(bad_rows, *needles):
        with pytest.raises(ValueError) as err:
            shard_encoders(bad_rows)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))

    other = dict(VAE_A, scaling_factor=0.18215)  # e.g. a resumed run with another scale
    fails(rows + [manifest_row(7, other, TEXT_A)], rows[0]["path"], "shards/image/256x256/000007.tar", "0.13025",
          "0.18215", "vae")
    fails(rows + [manifest_row(7, None, TEXT_A)], "000007.tar", "no vae record")  # a latent shard without a record
    fails(rows + [manifest_row(7, VAE_A, dict(TEXT_A, max_length=128))], "000007.tar", "text_encoder", "128")
    fails(rows + [manifest_row(7, VAE_A, None)], "000007.tar", "no text_encoder record")
    fails(rows + audio, "one modality")


def test_resume_refuses_other_encoders(tmp_path):
    """check_encoders (run at the start of run_prepare): a rerun must write its shards with the encoders of the shards
    already in the output, per modality it reads."""
    from pipelines.manifest import OutputState
    from pipelines.plan import check_encoders

    state = OutputState(str(tmp_path))
    state.sidecars = [manifest_row(0, VAE_A, TEXT_A), manifest_row(1, VAE_A, TEXT_A),
                      manifest_row(0, None, TEXT_A, modality=C.AUDIO, member=C.MEL_MEMBER)]
    cfg = from_dict(PrepareConfig, {"inputs": ["x"], "output": str(tmp_path)})
    same = {C.MANIFEST_VAE: VAE_A, C.MANIFEST_TEXT_ENCODER: TEXT_A}
    check_encoders(state, cfg, same)

    def refused(encoders, *needles, modalities=None):
        c = from_dict(PrepareConfig, {"inputs": ["x"], "output": str(tmp_path),
                                      "read": {"modalities": modalities or list(C.MODALITIES)}})
        with pytest.raises(ConfigError) as err:
            check_encoders(state, c, encoders)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))

    refused(dict(same, vae=dict(VAE_A, path="s3://models/other-vae")), "other-vae", "s3://models/vae", "new --output")
    refused(dict(same, vae=dict(VAE_A, latent_channels=16)), '"latent_channels": 16')
    refused(dict(same, vae=None), "would store images")  # latents in the output, images now
    refused(dict(same, text_encoder=dict(TEXT_A, layer=-1)), "text_encoder", '"layer": -1')
    refused(dict(same, text_encoder=None), "this run's is none (no encode.text_encoder")
    refused(dict(same, text_encoder=None), C.AUDIO, modalities=[C.AUDIO])  # audio shards have text features too
    # a modality this run does not read is not its business; audio shards never carry a VAE
    audio_only = from_dict(PrepareConfig, {"inputs": ["x"], "output": str(tmp_path), "read": {"modalities": [C.AUDIO]}})
    check_encoders(state, audio_only, dict(same, vae=dict(VAE_A, path="another")))
    # images stored as images: a run that adds latents is refused, one that stores images again is fine
    state.sidecars = [manifest_row(0, None, None, member="jpg")]
    check_encoders(state, cfg, {C.MANIFEST_VAE: None, C.MANIFEST_TEXT_ENCODER: None})
    refused(same, "stored as ['jpg']", "VAE latents")
    # latent shards from a prepare that recorded nothing: refused, since the output would end up half unknown
    state.sidecars = [{k: v for k, v in manifest_row(0).items() if k not in C.ENCODER_COLUMNS}]
    refused(dict(same, text_encoder=None), "older jobs.prepare")


def test_encoder_records_from_config_json_on_s3(tmp_path, s3_bucket, s3_server):
    """The records come from config.json alone (of an s3:// folder only that file is fetched), with the values the
    loaded models have; the path stays the reference the user gave."""
    import boto3

    from models.text_encoder import TextEncoder
    from models.vae import ImageVAE
    from pipelines.encode import encoder_records
    from pipelines.io import resolve_storage
    from tests.pipelines_fixtures import make_text_encoder, make_vae

    vae_dir, te_dir = make_vae(tmp_path / "vae"), make_text_encoder(tmp_path / "te")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.upload_file(f"{vae_dir}/config.json", s3_bucket, "models/vae/config.json")
    s3.upload_file(f"{te_dir}/config.json", s3_bucket, "models/te/config.json")
    cfg = from_dict(PrepareConfig, {"inputs": ["x"], "output": "y", "encode": {
        "vae": f"s3://{s3_bucket}/models/vae", "vae_shift_factor": 0.5,
        "text_encoder": f"s3://{s3_bucket}/models/te", "text_max_length": 64}})
    records = encoder_records(cfg, resolve_storage("s3://"))
    vae, te = ImageVAE.from_pretrained(vae_dir, shift_factor=0.5), TextEncoder.from_pretrained(te_dir, max_length=64)
    assert records == {
        C.MANIFEST_VAE: {"path": f"s3://{s3_bucket}/models/vae", "scaling_factor": vae.scaling_factor,
                         "shift_factor": 0.5, "latent_channels": vae.latent_channels},
        C.AUDIO_VAE: None,  # no encode.audio_vae
        C.MANIFEST_TEXT_ENCODER: {"path": f"s3://{s3_bucket}/models/te", "kind": "decoder", "layer": te.layer,
                                  "max_length": 64, "pad_to_multiple_of": te.pad_to_multiple_of,
                                  "hidden_size": te.hidden_size},
    }
    assert records[C.MANIFEST_VAE]["latent_channels"] == 4 and records[C.MANIFEST_TEXT_ENCODER]["hidden_size"] == 16
    assert set(records[C.MANIFEST_VAE]) == set(C.VAE_RECORD_KEYS)
    assert set(records[C.MANIFEST_TEXT_ENCODER]) == set(C.TEXT_ENCODER_RECORD_KEYS)
    # no VAE for a run without images; a missing model is a config error before any work
    no_images = from_dict(PrepareConfig, {**to_dict(cfg), "read": {"modalities": [C.AUDIO]}})
    assert encoder_records(no_images, resolve_storage("s3://"))[C.MANIFEST_VAE] is None
    missing = from_dict(PrepareConfig, {**to_dict(cfg), "encode": {"vae": f"s3://{s3_bucket}/nothing"}})
    with pytest.raises(ConfigError, match="encode.vae"):
        encoder_records(missing, resolve_storage("s3://"))


def test_folder_labels_and_the_vocabulary_of_an_output():
    from pipelines.config import ReadConfig
    from pipelines.labels import assign_labels, label_of
    from pipelines.sources import make_item

    folder = ReadConfig(label_from="folder")
    assert label_of(make_item("s3://b/train/cat/1.jpg", "image"), folder) == "cat"
    assert label_of(make_item("/data/shards/0.tar#dog/7.jpg", "image"), folder) == "dog"  # the member's folder
    assert label_of(make_item("/data/chairs/0.tar#7.jpg", "image"), folder) == "chairs"  # else the tar's
    items = [make_item(f"/d/{name}/{i}.npy", "points") for i, name in enumerate(["sphere", "cube", "sphere", "10",
                                                                                  "9"])]
    existing = {"class_names": ["sphere", "torus"]}  # a rerun keeps the indices written before and appends
    assert assign_labels(items, folder, existing) == ["sphere", "torus", "9", "10", "cube"]
    assert [json.loads(it["meta"])["label"] for it in items] == [0, 4, 0, 3, 2]
    column = ReadConfig(label_from="column")
    assert label_of(make_item("/d/x.npy", "points", meta={"label": " "}), column) is None
    assert label_of(make_item("/d/x.npy", "points", meta={"label": 3}), column) == "3"


def test_a_model_free_plan_never_imports_torch():
    """A curation job without model stages runs no torch: its driver (the job module, the plan) and its task workers
    (every stage of the plan, built as a worker builds them) import none, since importing torch costs each of those
    processes about a CPU-second (docs/benchmarks.md#curation). A plan with a model stage does import it."""
    script = """
import sys
from models.config_io import to_dict
import jobs.prepare
from pipelines.config import PrepareConfig
from pipelines.plan import build_plan
config = PrepareConfig(inputs=["in"], output="out")
config.read.modalities = ["image", "audio", "points"]
plan = build_plan(config, {}, encoders={})
for specs in plan.stages.values():
    for spec in specs:
        if spec.cls.__name__ not in ("Dedup", "WriteShards"):  # they look up the run's actors: no Ray runs here
            spec.cls(**spec.kwargs)
print("torch" in sys.modules)
config.filter.clip_model = "some/clip"
build_plan(config, {}, encoders={})
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_packed_samples_make_the_tar_tarfile_writes():
    """Samples packed in the tasks and appended by the writer give byte for byte the tar ``tarfile`` writes for the same
    members (sorted members, fixed owner, mode and mtime, the closing zero blocks and record padding), which every tar
    reader reads back as the samples."""
    import io
    import tarfile

    from pipelines.writer import FIXED_MTIME, SampleTar, pack_sample

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:016x}", "jpg": rng.bytes(int(rng.integers(0, 3000))), "txt": b"a caption",
                "json": b'{"k": 1}'} for i in range(5)] + [{"__key__": "empty", "txt": b""}]
    ours = io.BytesIO()
    tar = SampleTar(ours)
    for sample in samples:
        tar.write(pack_sample(sample))
    tar.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w|", format=tarfile.USTAR_FORMAT) as ref:
        for sample in samples:
            for name in sorted(k for k in sample if not k.startswith("_")):
                info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                info.size, info.mtime, info.mode, info.uname, info.gname = (len(sample[name]), FIXED_MTIME, 0o444,
                                                                          "bigdata", "bigdata")
                ref.addfile(info, io.BytesIO(sample[name]))
    assert ours.getvalue() == reference.getvalue()
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue())) as back:
        members = {m.name: back.extractfile(m).read() for m in back.getmembers()}
    assert members == {f"{s['__key__']}.{k}": v for s in samples for k, v in s.items() if k != "__key__"}


def test_greyscale_decoded_as_one_band_gives_the_pixels_of_rgb():
    """A greyscale JPEG is resampled as one band and made RGB at the bucket's size: exactly the pixels of making it RGB
    first (what a colour image goes through), at every scale the decoder and the reduction take."""
    import io

    from PIL import Image

    from pipelines.buckets import cover_size, fit_to_bucket

    rng = np.random.default_rng(0)
    cfg, sizes = PrepareConfig().decode.image, image_bucket_sizes(256, 4.0)
    for w, h in [(1900, 1200), (700, 300), (300, 700), (120, 90), (256, 256)]:
        buf = io.BytesIO()
        Image.fromarray(make_image(rng, w, h)).convert("L").save(buf, format="JPEG", quality=90)
        ours, bucket, info = decode_to_bucket(buf.getvalue(), cfg, sizes)
        assert info["mode"] == "L" and ours.mode == "RGB"
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.draft("RGB", cover_size(w, h, bucket))
        cw, ch = cover_size(w, h, bucket)
        rgb = img.convert("RGB")
        factor = min(rgb.size[0] // cw, rgb.size[1] // ch)
        rgb = rgb.reduce(factor) if factor >= 2 else rgb
        assert np.array_equal(np.asarray(ours), np.asarray(fit_to_bucket(rgb, bucket))), (w, h)


def test_task_batches_give_every_cpu_work_and_stay_at_most_the_batch_size():
    """A task stage's rows per task: its batch size for a big job; for a job too small to give every CPU a task of
    that size, smaller, so that every CPU gets one (tasks of 1 CPU on 2 CPUs: 2 tasks; of 0.5 CPU: 4)."""
    from pipelines.config import Resources
    from pipelines.plan import task_batch_size

    r = Resources(batch_size=128)
    assert task_batch_size(r, 2000, 2.0) == 128
    assert task_batch_size(r, 96, 2.0) == 48 and task_batch_size(r, 96, 64.0) == 2
    assert task_batch_size(Resources(num_cpus=0.5, batch_size=128), 96, 2.0) == 24
    assert task_batch_size(r, 1, 8.0) == 1 and task_batch_size(r, 5, 0.0) == 5


def test_writers_scale_with_the_cluster_unless_set():
    """``write.num_writers=0`` (the default): one writer per CPUS_PER_WRITER CPUs of the cluster, at least one; a count
    that is set stays; a negative count is refused with its name."""
    from pipelines.config import CPUS_PER_WRITER, WriteConfig

    auto = WriteConfig()
    assert auto.num_writers == 0
    assert auto.writers(2.0) == 1 and auto.writers(CPUS_PER_WRITER) == 1
    assert auto.writers(CPUS_PER_WRITER + 1) == 2 and auto.writers(10 * CPUS_PER_WRITER) == 10
    assert auto.writers(0.0) == 1
    assert WriteConfig(num_writers=3).writers(2.0) == 3
    with pytest.raises(ConfigError, match="write.num_writers"):
        resolve_config(PrepareConfig, overrides=["inputs=[a]", "output=b", "write.num_writers=-1"]).validate()


def test_one_writer_call_per_batch_writes_what_a_call_per_bucket_writes(tmp_path):
    """``ShardWriter.add_batch`` (every bucket of a batch in one actor call) commits the shards, sidecars and records
    that one ``add`` per bucket commits."""
    from pipelines.writer import PackedSample, ShardWriter, pack_sample

    info = {"member": "jpg", "shape": [16, 16, 3], "dtype": "uint8", "micro_batch": 1}

    def packed(batch: int, side: int) -> list[PackedSample]:
        keys = [f"{batch}-{side}-{i}" for i in range(3)]
        return [PackedSample(pack_sample({"__key__": k, "jpg": b"x" * i}), {"key": k}, False) for i, k in enumerate(keys)]

    batches = [{f"image/{side}x{side}": (info, packed(b, side)) for side in (16, 32)} for b in range(3)]
    outputs = {}
    for how in ("add", "add_batch"):
        writer = ShardWriter(str(tmp_path / how), {}, "run", 4, {}, {})
        for slots in batches:
            if how == "add":
                for slot, (slot_info, samples) in slots.items():
                    writer.add(slot, slot_info, samples)
            else:
                writer.add_batch(slots)
        assert writer.flush() == {"shards": 6, "samples": 18}
        outputs[how] = {p.relative_to(tmp_path / how): p.read_bytes() for p in sorted((tmp_path / how).rglob("*.tar"))}
        sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / how).rglob("*.json"))]
        outputs[how + " records"] = [(s["path"], s["samples"], s["sha256"], s["records"]) for s in sidecars]
    assert outputs["add"] == outputs["add_batch"] and len(outputs["add"]) == 6
    assert outputs["add records"] == outputs["add_batch records"]


def test_vae_encode_in_bfloat16_gives_the_float32_latents_to_its_precision(tmp_path):
    """``encode.vae_dtype=bfloat16`` (the GPU setting) computes the same latents as float32, within bfloat16's
    precision: the stage casts the VAE, not the meaning of its output (float32, scaled, in ``latent_dtype``)."""
    from pipelines.encode import VaeEncode
    from tests.pipelines_fixtures import make_vae

    config = PrepareConfig()
    config.encode.vae, config.encode.latent_mode = make_vae(tmp_path / "vae"), "mean"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    latents = {}
    for dtype in ("float32", "bfloat16"):
        config.encode.vae_dtype = dtype
        rows, _ = VaeEncode(to_dict(config), device="cpu").process_rows(
            [{C.KEY: f"{i:016x}", C.PAYLOAD: image, C.META: {}} for i, image in enumerate(images)])
        latents[dtype] = np.stack([r[C.TENSOR] for r in rows]).astype(np.float32)
    assert latents["float32"].shape == (2, 4, 4, 6) and latents["bfloat16"].dtype == np.float32
    scale = np.abs(latents["float32"]).max()
    assert np.abs(latents["bfloat16"] - latents["float32"]).max() < 0.05 * scale
    assert not np.array_equal(latents["bfloat16"], latents["float32"])  # it did compute in bfloat16
