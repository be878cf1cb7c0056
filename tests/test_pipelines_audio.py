"""Audio curation for text-to-audio / text-to-music (issue 15, paper §5.2): mel-VAE latents (``encode.audio_vae``) with
the VAE's own log-mel parameters, duration buckets with truncation and optional padding, the structured caption, the
mel VAE's record in the manifest and stats — tiny random models on the CPU (docs/curation.md#encodings)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio_vae import AUDIO_VAE_FORMAT, AudioVAE, AudioVAEConfig
from models.config_io import ConfigError, from_dict, to_dict
from models.mel import MelConfig, frames_for
from pipelines import constants as C
from pipelines.buckets import Bucketize
from pipelines.config import PrepareConfig
from pipelines.encode import AudioVaeEncode, encoder_records, run_mel
from pipelines.stage import Reject
from tests.pipelines_fixtures import make_vae, wav_bytes, write_images

RATE = 22_050  # the test VAE's mel sample rate: not the default 16 kHz, so every stage must take it from the VAE


def make_audio_vae(path: Path, seed: int = 0, **mel) -> str:
    """The tiny mel VAE (tests/test_audio_vae.py's), saved with save_pretrained; ``mel`` overrides its MelConfig."""
    torch.manual_seed(seed)
    AudioVAE(from_dict(AudioVAEConfig, {"preset": "tiny", "mel": mel})).save_pretrained(path)
    return str(path)


def latent_frames(seconds: float, mel: MelConfig) -> tuple[int, int]:
    """(mel frames, latent frames) of a bucket: T = n // hop + 1 for its n samples, ⌈T / 2⌉ latent frames."""
    frames = frames_for(round(seconds * mel.sample_rate), mel)
    return frames, math.ceil(frames / 2)


def prepare_config(inputs, output, **sections) -> PrepareConfig:
    data = {"inputs": [str(i) for i in inputs], "output": str(output), "progress": False,
            "bucket": {"image": {"max_patches": 256, "batch_tokens": 1024}, "audio_durations_s": [2.0, 5.0]}}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return from_dict(PrepareConfig, data)


def tone(seconds: float, rate: int, freq: float = 440.0, stereo: bool = False) -> np.ndarray:
    rng = np.random.default_rng(int(freq))
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.normal(size=t.shape)
    return (np.stack([wave, 0.5 * wave], axis=1) if stereo else wave).astype(np.float32)


def audio_row(seconds: float, rate: int = C.SAMPLE_RATE, key: int = 1) -> dict:
    return {C.KEY: f"{key:016x}", C.SOURCE: f"s{key}.wav", C.MODALITY: C.AUDIO, C.META: "{}",
            C.PAYLOAD: tone(seconds, rate, 220.0 + key)}


# ---- units (no Ray) --------------------------------------------------------------------------------------------------
def test_audio_vae_record_and_mel_come_from_the_vae_folder(tmp_path):
    folder = make_audio_vae(tmp_path / "avae", sample_rate=RATE)
    cfg = prepare_config(["x"], "y", encode={"audio_vae": folder})
    records = encoder_records(cfg)
    record = records[C.AUDIO_VAE]
    assert set(record) == set(C.AUDIO_VAE_RECORD_KEYS) and records[C.MANIFEST_VAE] is None
    assert record["path"] == folder and record["format"] == AUDIO_VAE_FORMAT
    assert (record["latent_channels"], record["downsample"], record["scaling_factor"]) == (20, 2, 1.0)
    assert run_mel(records) == MelConfig(sample_rate=RATE) and run_mel({C.AUDIO_VAE: None}) == MelConfig()
    # the record of the loaded model is the driver's: the encode actor checks it, and refuses another
    AudioVaeEncode(to_dict(cfg), device="cpu", record=record)
    with pytest.raises(RuntimeError, match="manifest would be wrong"):
        AudioVaeEncode(to_dict(cfg), device="cpu", record=dict(record, latent_channels=8))
    # no audio read, or encoding off: no mel VAE, the default features
    for other in ({"read": {"modalities": [C.IMAGE]}}, {"encode": {"audio_vae": folder, "enabled": False}}):
        assert encoder_records(prepare_config(["x"], "y", **other))[C.AUDIO_VAE] is None


def test_a_folder_that_is_no_mel_vae_is_a_config_error_before_work(tmp_path, capsys):
    from jobs.prepare import main

    image_vae = make_vae(tmp_path / "image-vae")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"format": AUDIO_VAE_FORMAT}))
    for folder, needle in ((image_vae, "has format None"), (tmp_path / "nothing", "no config.json"),
                           (broken, "not that of a mel VAE")):
        cfg = prepare_config(["x"], tmp_path / "out", encode={"audio_vae": str(folder)})
        with pytest.raises(ConfigError) as err:
            encoder_records(cfg)
        assert "encode.audio_vae" in str(err.value) and needle in str(err.value), str(err.value)
    # --dry-run validates it too, and shows the VAE stage and the buckets at the VAE's sample rate
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--dry-run"]
    with pytest.raises(ConfigError, match="encode.audio_vae"):
        main(args + ["--set", f"encode.audio_vae={image_vae}"])
    folder = make_audio_vae(tmp_path / "avae", sample_rate=RATE)
    assert main(args + ["--set", f"encode.audio_vae={folder}", "--set", "encode.audio_vae_resources.num_gpus=1"]) == 0
    out = capsys.readouterr().out
    assert "AudioVaeEncode: actors×1, cpus=0.5, gpus=1.0" in out and "2s(mb 160)" in out
    assert not (tmp_path / "out").exists()


def test_buckets_truncate_long_clips_and_pad_short_ones_on_request():
    def bucketed(seconds: float, **bucket) -> dict:
        cfg = prepare_config(["x"], "y", bucket={"audio_durations_s": [2.0, 5.0, 10.0], **bucket})
        return Bucketize(to_dict(cfg)).process_row(audio_row(seconds))

    row = bucketed(7.0)  # the longest bucket it fills, centre crop
    assert (row[C.BUCKET], len(row[C.PAYLOAD])) == ("5s", 5 * C.SAMPLE_RATE)
    assert row[C.META][C.CROP_START] == 1.0 and row[C.META][C.PAD] == 0.0
    row = bucketed(40.0)  # longer than every bucket: truncated to the largest
    assert (row[C.BUCKET], row[C.META][C.CROP_START]) == ("10s", 15.0)
    with pytest.raises(Reject) as err:  # shorter than every bucket, no padding
        bucketed(1.5)
    assert err.value.reason == C.Reason.NO_BUCKET and "audio_pad_to_s" in err.value.message
    # padding: every clip shorter than bucket.audio_pad_to_s goes to that bucket, silence after it
    for seconds in (1.5, 3.0):
        row = bucketed(seconds, audio_pad_to_s=5.0)
        wave = row[C.PAYLOAD]
        assert (row[C.BUCKET], len(wave), wave.dtype) == ("5s", 5 * C.SAMPLE_RATE, np.float32)
        n = int(seconds * C.SAMPLE_RATE)
        assert np.array_equal(wave[:n], audio_row(seconds)[C.PAYLOAD]) and not wave[n:].any()
        assert row[C.META][C.PAD] == 5.0 - seconds and row[C.META][C.CROP_START] == 0.0
    assert bucketed(7.0, audio_pad_to_s=5.0)[C.BUCKET] == "5s"  # longer than the pad target: cropped as before
    assert bucketed(12.0, audio_pad_to_s=5.0)[C.BUCKET] == "10s"
    # the paper's audio setting: every clip 10 s, shorter ones padded, longer ones cut
    paper = {"audio_durations_s": [10.0], "audio_pad_to_s": 10.0}
    assert [bucketed(s, **paper)[C.META][C.PAD] for s in (4.0, 25.0)] == [6.0, 0.0]
    # the bucket sample counts follow the run's mel sample rate
    cfg = prepare_config(["x"], "y")
    row = Bucketize(to_dict(cfg), mel=to_dict(MelConfig(sample_rate=RATE))).process_row(audio_row(2.5, RATE))
    assert (row[C.BUCKET], len(row[C.PAYLOAD])) == ("2s", 2 * RATE)
    with pytest.raises(ConfigError, match="one of bucket.audio_durations_s"):
        prepare_config(["x"], "y", bucket={"audio_pad_to_s": 3.0}).validate()


def test_padded_clips_encode_to_the_bucket_latent(tmp_path):
    """A padded 1.5 s clip and a cropped 4 s clip of the 2 s bucket give latents of one shape, which decode to the
    bucket's frame count; latents are stored in encode.latent_dtype like the image VAE's."""
    folder = make_audio_vae(tmp_path / "avae")
    cfg = prepare_config(["x"], "y", encode={"audio_vae": folder, "latent_mode": "mean", "latent_dtype": "float32"},
                         bucket={"audio_pad_to_s": 2.0})
    record = encoder_records(cfg)[C.AUDIO_VAE]
    mel = to_dict(run_mel({C.AUDIO_VAE: record}))
    rows, rejects = Bucketize(to_dict(cfg), mel=mel).process_rows([audio_row(1.5, key=1), audio_row(4.0, key=2)])
    assert not rejects and [r[C.META][C.PAD] for r in rows] == [0.5, 0.0]
    rows, _ = AudioVaeEncode(to_dict(cfg), device="cpu", record=record).process_rows(rows)
    frames, latent = latent_frames(2.0, MelConfig())
    vae = AudioVAE.from_pretrained(folder)
    for r in rows:
        assert r[C.TENSOR].shape == (20, latent) and r[C.TENSOR].dtype == np.float32
        assert r[C.META]["latent"] == {"scaling_factor": 1.0, "shift_factor": 0.0, "mode": "mean",
                                       "mel_frames": frames}
        decoded = vae.decode(torch.from_numpy(r[C.TENSOR])[None], frames=r[C.META]["latent"]["mel_frames"])
        assert decoded.shape == (1, 80, frames)
    # mean latents are the VAE's encoding of its own log-mel of the bucket-sized clip
    from models.mel import log_mel

    wave = torch.from_numpy(np.pad(audio_row(1.5, key=1)[C.PAYLOAD], (0, C.SAMPLE_RATE // 2)))
    np.testing.assert_allclose(rows[0][C.TENSOR], vae.encode(log_mel(wave[None]), sample=False)[0].numpy(),
                               atol=1e-5)


def test_structured_caption_is_the_sources_or_the_caption():
    from pipelines.stage import structured_caption

    assert structured_caption(None, "a tone") == structured_caption("  ", "a tone") == "a tone"
    assert structured_caption({}, "a tone") == "a tone"
    assert structured_caption("genre: ambient", "a tone") == "genre: ambient"
    assert structured_caption({"tempo": 90, "genre": "jazz"}, "x") == '{"genre": "jazz", "tempo": 90}'


def test_resume_refuses_another_audio_vae():
    from pipelines.manifest import OutputState
    from pipelines.plan import check_encoders
    from pipelines.shards import encoder_json

    record = {"path": "s3://models/mel-vae", "format": AUDIO_VAE_FORMAT, "scaling_factor": 1.0, "shift_factor": 0.0,
              "latent_channels": 20, "downsample": 2, "mel": to_dict(MelConfig())}

    def row(member, vae):
        return {"path": "shards/audio/2s/000000.tar", "modality": C.AUDIO, "bucket": "2s", "member": member,
                C.MANIFEST_VAE: encoder_json(vae), C.MANIFEST_TEXT_ENCODER: None}

    state = OutputState("unused")
    cfg = prepare_config(["x"], "out", read={"modalities": [C.AUDIO]})
    same = {C.MANIFEST_VAE: None, C.AUDIO_VAE: record, C.MANIFEST_TEXT_ENCODER: None}
    state.sidecars = [row(C.LATENT_MEMBER, record)]
    check_encoders(state, cfg, same)
    check_encoders(state, cfg, dict(same, vae={"path": "an image VAE"}))  # the image VAE is not the audio shards'

    def refused(encoders, *needles):
        with pytest.raises(ConfigError) as err:
            check_encoders(state, cfg, encoders)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))

    refused(dict(same, audio_vae=dict(record, path="s3://models/other")), "holds audio shards", "s3://models/other",
            "new --output")
    refused(dict(same, audio_vae=dict(record, mel=to_dict(MelConfig(sample_rate=RATE)))), f'"sample_rate": {RATE}')
    refused(dict(same, audio_vae=None), "would store log-mel (no encode.audio_vae")
    state.sidecars = [row(C.MEL_MEMBER, None)]  # log-mel shards: latents may not join them
    check_encoders(state, cfg, dict(same, audio_vae=None))
    refused(same, "audio shards stored as ['mel.npy']", "VAE latents")


def test_audio_vae_on_s3(tmp_path, s3_bucket, s3_server, monkeypatch):
    """encode.audio_vae=s3://…: the driver reads only its config.json, the encode actor loads it through the cache."""
    import boto3

    from pipelines.io import resolve_storage

    monkeypatch.setenv("LUMINA_CACHE", str(tmp_path / "cache"))
    folder = Path(make_audio_vae(tmp_path / "avae", sample_rate=RATE))
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for name in ("config.json", "model.safetensors"):
        s3.upload_file(str(folder / name), s3_bucket, f"models/avae/{name}")
    uri = f"s3://{s3_bucket}/models/avae"
    cfg = prepare_config(["x"], "y", encode={"audio_vae": uri})
    record = encoder_records(cfg, resolve_storage("s3://"))[C.AUDIO_VAE]
    assert record["path"] == uri and record["mel"]["sample_rate"] == RATE
    rows, _ = AudioVaeEncode(to_dict(cfg), device="cpu", record=record).process_rows([audio_row(2.0, RATE)])
    assert rows[0][C.TENSOR].shape == (20, latent_frames(2.0, MelConfig(sample_rate=RATE))[1])


# ---- the prepare job (Ray) -------------------------------------------------------------------------------------------
def write_clips(folder: Path) -> dict[str, tuple[float, int]]:
    """Clips at several rates, channel counts and formats: {file name: (seconds, rate)}; captions in sidecars, one
    with a structured caption of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = {"a.wav": (2.5, 16_000), "b.flac": (3.0, 44_100), "c.wav": (5.6, 22_050), "long.wav": (8.0, 16_000),
             "short.wav": (1.5, 16_000), "tiny.wav": (0.5, 16_000)}
    for i, (name, (seconds, rate)) in enumerate(clips.items()):
        path = folder / name
        path.write_bytes(wav_bytes(tone(seconds, rate, 200.0 + 50 * i, stereo=i % 2 == 1), rate,
                                   fmt=path.suffix[1:].upper()))
        if name == "b.flac":
            path.with_suffix(".json").write_text(json.dumps({"caption": "music number 2",
                                                             C.STRUCTURED_CAPTION: "genre: ambient | tempo: slow"}))
        else:
            path.with_suffix(".txt").write_text(f"a tone number {i}")
    return clips


def test_prepare_audio_latents_next_to_image_latents(ray_cluster, tmp_path):
    """One run, image VAE and mel VAE side by side: audio latent shards shaped (20, ⌈T / 2⌉) by the VAE's own mel
    parameters (22.05 kHz here), the mel VAE recorded on their manifest rows and in stats.json, latents that decode to
    the bucket's frame count; long clips truncated, clips too short set aside with their reasons; the structured
    caption; a rerun with another mel VAE, or none, refused before any work."""
    from pipelines.plan import run_prepare
    from pipelines.shards import iter_samples, read_manifest, read_rejects, shard_encoders, shard_url

    models = tmp_path / "models"
    audio_vae, image_vae = make_audio_vae(models / "avae", sample_rate=RATE), make_vae(models / "vae")
    write_images(tmp_path / "in" / "img", 3)
    clips = write_clips(tmp_path / "in" / "snd")
    cfg = prepare_config([tmp_path / "in"], tmp_path / "out", encode={"vae": image_vae, "audio_vae": audio_vae},
                         write={"samples_per_shard": 4})
    # a folder that is no mel VAE: a config error before anything is written
    with pytest.raises(ConfigError, match="encode.audio_vae"):
        run_prepare(dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, audio_vae=image_vae)))
    assert not Path(cfg.output).exists()

    stats = run_prepare(cfg)
    out = cfg.output
    mel = MelConfig(sample_rate=RATE)
    record = encoder_records(cfg)[C.AUDIO_VAE]
    assert stats[C.STATS_ENCODERS][C.AUDIO_VAE] == record and record["mel"]["sample_rate"] == RATE
    assert stats[C.STATS_ENCODERS][C.MANIFEST_VAE]["path"] == image_vae
    assert json.loads((Path(out) / C.STATS_FILE).read_text())[C.STATS_ENCODERS] == stats[C.STATS_ENCODERS]
    rows = read_manifest(out).to_pylist()
    audio_rows = [r for r in rows if r["modality"] == C.AUDIO]
    assert {r["bucket"] for r in audio_rows} == {"2s", "5s"}
    for r in audio_rows:
        assert (r["member"], r["dtype"]) == (C.LATENT_MEMBER, "float16")
        assert r["shape"] == [20, latent_frames(float(r["bucket"].rstrip("s")), mel)[1]]
        assert r[C.MANIFEST_VAE] == json.dumps(record, sort_keys=True)
    image_rows = [r for r in rows if r["modality"] == C.IMAGE]
    assert image_rows and all(json.loads(r[C.MANIFEST_VAE])["path"] == image_vae for r in image_rows)
    assert shard_encoders(audio_rows)[C.MANIFEST_VAE] == record

    vae = AudioVAE.from_pretrained(audio_vae)
    samples = {Path(s["meta"]["source"]).name: s for r in audio_rows
               for s in iter_samples(shard_url(out, r["path"]))}
    assert sorted(samples) == ["a.wav", "b.flac", "c.wav", "long.wav"]
    for name, s in samples.items():
        meta, latent = s["meta"], s["tensor"]
        frames, _ = latent_frames(float(meta["bucket"].rstrip("s")), mel)
        assert latent.shape == (20, math.ceil(frames / 2)) and latent.dtype == np.float16
        assert meta["latent"]["mel_frames"] == frames and meta["member"] == C.LATENT_MEMBER
        decoded = vae.decode(torch.from_numpy(latent.astype(np.float32))[None], frames=meta["latent"]["mel_frames"])
        assert decoded.shape == (1, 80, frames)
        assert abs(meta[C.DURATION] - clips[name][0]) < 1e-3 and meta[C.PAD] == 0.0
        expected = "genre: ambient | tempo: slow" if name == "b.flac" else s["caption"]
        assert meta[C.STRUCTURED_CAPTION] == expected and s["caption"]
    assert samples["long.wav"]["meta"]["bucket"] == "5s" and samples["long.wav"]["meta"][C.CROP_START] == 1.5
    assert samples["b.flac"]["caption"] == "music number 2"
    rejects = {Path(r["source"]).name: (r["stage"], r["reason"]) for r in read_rejects(out).to_pylist()}
    assert rejects == {"short.wav": (C.STAGE_BUCKET, C.Reason.NO_BUCKET),
                       "tiny.wav": (C.STAGE_FILTER, C.Reason.TOO_SHORT)}
    assert stats["run"]["stages"][C.STAGE_BUCKET]["rejected"] == {C.Reason.NO_BUCKET: 1}

    # a rerun with another mel VAE, or with none (log-mel), is refused at the start, the output untouched
    before = sorted(p.name for p in Path(out).rglob("*"))
    other = make_audio_vae(models / "avae2", seed=1, sample_rate=RATE)
    for audio, message in ((other, other), (None, "would store log-mel")):
        rerun = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, audio_vae=audio))
        with pytest.raises(ConfigError, match="holds audio shards") as err:
            run_prepare(rerun)
        assert message in str(err.value) and "new --output" in str(err.value), str(err.value)
    assert sorted(p.name for p in Path(out).rglob("*")) == before
