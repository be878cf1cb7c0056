"""``python -m jobs.train_vae --modality audio``: the mel VAE trained with Ray Train (2 CPU workers, gloo, DDP of the
VAE and the discriminator) on synthetic tones — a folder of audio files with bad ones, and the audio shards of
a real ``jobs.prepare`` output — and the errors the driver gives before any worker starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.audio_vae_training import HISTORY_FILE, TrainAudioVAEConfig, file_mel, find_sources, load_clips, read_history
from jobs.train_vae import main
from models.audio_vae import AudioVAE, read_audio_vae_config
from models.config_io import ConfigError, from_dict
from models.mel import MelConfig, frames_for
from pipelines import constants as C
from tests.pipelines_fixtures import wav_bytes, write_audio, write_images

STEPS = 30
DISC_START = 21  # the last 10 steps train the discriminator and add the adversarial term


BAD = {"0_bad_header.wav": "not decodable", "2_empty.wav": "zero bytes", "4_garbage.mp3": "not decodable",
       "6_short.wav": "shorter than half an FFT window"}


def write_tones(folder: Path) -> dict[str, str]:
    """Four tones (16 / 22.05 / 44.1 kHz, mono and stereo, wav and flac, 1.2 to 2 s; one in a subfolder: the folder is
    searched recursively) and four bad files (``BAD``), a text file. In sorted order the bad files are every other one,
    so with 2 workers the first one's share decodes to nothing (it then trains on the other's clips)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = {}
    for i, (name, rate, seconds) in enumerate([("1_tone.wav", 16000, 2.0), ("3_tone.wav", 22050, 1.5),
                                               ("5_tone.flac", 44100, 1.2), ("7_nested/tone.wav", 16000, 1.6)]):
        t = np.arange(int(rate * seconds)) / rate
        wave = 0.4 * np.sin(2 * np.pi * (220 * (i + 1)) * t) + 0.01 * rng.normal(size=t.shape)
        if i % 2:
            wave = np.stack([wave, 0.5 * wave], axis=1)
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(wav_bytes(wave.astype(np.float32), rate, fmt=path.suffix[1:].upper()))
        names[name] = str(path)
    (folder / "0_bad_header.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    (folder / "2_empty.wav").write_bytes(b"")
    (folder / "4_garbage.mp3").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (folder / "6_short.wav").write_bytes(wav_bytes(np.zeros(100, np.float32), 16000))
    (folder / "notes.txt").write_text("not audio")
    return names


def train(data, output, *extra: str) -> int:
    return main(["--modality", "audio", "--data", str(data), "--output", str(output), "--preset", "tiny",
                 "--workers", "2", "--lr", "1e-2", "--batch-size", "4", "--crop-frames", "32", *extra])


# ---- end to end on Ray Train --------------------------------------------------------------------------------------
def test_trains_on_a_folder_of_audio_files(ray_cluster, tmp_path):
    tones = write_tones(tmp_path / "audio")
    out = tmp_path / "vae"
    assert train(tmp_path / "audio", out, "--steps", str(STEPS), "--disc-start", str(DISC_START),
                 "--set", "scale_batches=2") == 0

    assert sorted(p.name for p in out.iterdir()) == ["config.json", HISTORY_FILE, "model.safetensors"]
    vae = AudioVAE.from_pretrained(out)
    expected = from_dict(TrainAudioVAEConfig, {"data": "d", "output": "o", "model": {"preset": "tiny"}}).model
    assert vae.config.mel == expected.mel == MelConfig()  # the features it was trained on travel with it
    assert (vae.config.channels, vae.config.channel_mult) == (expected.channels, expected.channel_mult)
    scale = vae.config.scaling_factor
    assert math.isfinite(scale) and scale > 0 and abs(scale - 1) > 1e-3
    assert read_audio_vae_config(str(out)).scaling_factor == scale

    history = read_history(str(out))
    steps = history["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))  # logged every step
    rec = [s["rec_l1"] for s in steps]
    assert np.mean(rec[-5:]) < 0.5 * np.mean(rec[:3]), rec
    assert all("d_loss" in s and "adv_weight" in s for s in steps[DISC_START - 1:])  # the GAN part ran (DDP)
    assert not any("d_loss" in s for s in steps[:DISC_START - 1])
    assert history["scaling_factor"] == pytest.approx(scale) and history["latent_std"] == pytest.approx(1 / scale)
    assert history["data"]["clips"] == len(tones) and history["workers"] == 2
    skipped = {Path(s["source"]).name: s["reason"] for s in history["data"]["skipped"]}  # counted, with reasons
    assert sorted(skipped) == sorted(BAD) and all(BAD[name] in reason for name, reason in skipped.items()), skipped

    # the measured scale normalises the latents of the training data (about unit variance)
    mel = file_mel(tones["1_tone.wav"], vae.mel)[None]
    torch.manual_seed(0)
    latent = vae.encode(mel)
    assert latent.shape == (1, vae.config.latent_channels, vae.latent_frames(mel.shape[-1]))
    assert 0.5 < float(latent.std()) < 2.0
    assert vae.decode(latent, mel.shape[-1]).shape == mel.shape


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """Tones and two images through the real jobs.prepare: audio shards with mel.npy, and an image shard."""
    from jobs.prepare import main as prepare

    root = tmp_path_factory.mktemp("prepare")
    write_audio(root / "raw" / "snd", 4)
    write_images(root / "raw" / "img", 2)
    out = root / "prepared"
    assert prepare(["--input", str(root / "raw"), "--output", str(out), "--set", "filter.dedup_perceptual=false",
                    "--set", "progress=false"]) == 0
    return out


@pytest.fixture(scope="module")
def shard_run(prepared, tmp_path_factory):
    """6 uninterrupted steps on the prepare output's audio shards, a checkpoint every 3."""
    out = tmp_path_factory.mktemp("shard-run") / "vae"
    assert train(prepared, out, "--steps", "6", "--set", "checkpoint_every=3") == 0
    return out


def test_trains_on_the_audio_shards_of_a_prepare_output(prepared, shard_run):
    sources = find_sources(from_dict(TrainAudioVAEConfig, {"data": str(prepared), "output": "o"}))
    assert sources.kind == "shards" and sources.samples == 4
    vae = AudioVAE.from_pretrained(shard_run)
    history = read_history(str(shard_run))
    assert history["data"] == {"kind": "shards", "sources": len(sources.items), "clips": 4, "skipped": []}
    assert len(history["steps"]) == 6 and math.isfinite(vae.config.scaling_factor)
    # checkpoints beside the model folder (not in it), the newest two kept
    run = Path(f"{shard_run}.checkpoints") / "train-audio-vae"
    assert sorted(p.name for p in run.glob("checkpoint_*")) and (shard_run / "config.json").exists()


def test_a_rerun_resumes_from_the_latest_checkpoint_with_the_same_draws(prepared, shard_run, tmp_path):
    """Stopped after 3 steps and run again to 6 (the same command, more steps): steps 4–6 continue from the checkpoint
    — weights, optimizers and every rank's generators — so the losses are an uninterrupted run's."""
    out = tmp_path / "vae"
    assert train(prepared, out, "--steps", "3", "--set", "checkpoint_every=3") == 0
    assert train(prepared, out, "--steps", "6", "--set", "checkpoint_every=3") == 0
    resumed, uninterrupted = read_history(str(out))["steps"], read_history(str(shard_run))["steps"]
    assert [s["step"] for s in resumed] == list(range(1, 7))
    for a, b in zip(resumed, uninterrupted):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_another_architecture_is_a_config_error(tmp_path):
    """A rerun whose model config changed cannot resume the old run's checkpoint: a ConfigError, not a state-dict
    traceback; a checkpoint of another worker count re-seeds the generators instead of restoring them."""
    from jobs.audio_vae_training import load_state, save_state
    from models.audio_vae_losses import MultiWindowDiscriminator

    def parts(channels: int):
        vae = AudioVAE(from_dict(TrainAudioVAEConfig, {"data": "d", "output": "o", "model": {
            "preset": "tiny", "channels": channels}}).model)
        disc = MultiWindowDiscriminator(TrainAudioVAEConfig(data="d", output="o").loss.discriminator)
        optimizers = {"opt_vae": torch.optim.Adam(vae.parameters()), "opt_disc": torch.optim.Adam(disc.parameters())}
        return {"vae": vae, "disc": disc}, optimizers, {"crops": torch.Generator().manual_seed(1)}

    nets, optimizers, generators = parts(8)
    save_state(str(tmp_path), 5, 2, 0, nets, optimizers, [{"step": 5}], generators)
    state = generators["crops"].get_state()
    nets, optimizers, generators = parts(8)
    assert load_state(str(tmp_path), 0, 0, 2, nets, optimizers, generators) == (5, [{"step": 5}])
    assert torch.equal(generators["crops"].get_state(), state)  # same world: the draws continue
    load_state(str(tmp_path), 0, 0, 3, nets, optimizers, generators)
    assert not torch.equal(generators["crops"].get_state(), state)  # another world: re-seeded
    with pytest.raises(ConfigError, match="does not fit the configured model"):
        load_state(str(tmp_path), 0, 0, 2, *parts(16))


def test_audio_on_a_prepare_output_without_audio_is_an_error(prepared, tmp_path):
    images_only = tmp_path / "images-only"
    images_only.mkdir()
    manifest = pq.read_table(prepared / C.MANIFEST_FILE)
    assert set(manifest.column("modality").to_pylist()) == {C.AUDIO, C.IMAGE}
    rows = [r for r in manifest.to_pylist() if r["modality"] == C.IMAGE]  # what an image-only run commits
    pq.write_table(manifest.from_pylist(rows, schema=manifest.schema), images_only / C.MANIFEST_FILE)
    with pytest.raises(ConfigError, match="jobs.prepare output without audio shards .*holds image"):
        train(images_only, tmp_path / "vae", "--steps", "1")
    with pytest.raises(ConfigError, match="default MelConfig"):  # shards' mels are not those of another MelConfig
        train(prepared, tmp_path / "vae", "--steps", "1", "--set", "model.mel.n_mels=64")
    assert not (tmp_path / "vae").exists()


# ---- errors and pieces, without Ray ---------------------------------------------------------------------------------
def test_an_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no audio files \(\.wav, \.flac"):
        train(tmp_path / "empty", tmp_path / "vae", "--steps", "1")
    write_images(tmp_path / "images", 1)
    with pytest.raises(ConfigError, match="no audio files"):
        train(tmp_path / "images", tmp_path / "vae", "--steps", "1")
    with pytest.raises(ConfigError, match="no such folder"):
        train(tmp_path / "missing", tmp_path / "vae", "--steps", "1")


def test_flags_and_config(tmp_path, caplog):
    write_tones(tmp_path / "audio")
    caplog.set_level("INFO")
    assert train(tmp_path / "audio", tmp_path / "vae", "--dry-run", "--kl-weight", "1e-5", "--disc-start", "7") == 0
    assert "8 audio files" in caplog.text and not (tmp_path / "vae").exists()  # bad files show when decoded
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        main(["--modality", "audio", "--data", str(tmp_path), "--output", "o", "--preset", "huge", "--dry-run"])
    with pytest.raises(ConfigError, match="--preset, --crop-frames: only with --modality audio"):
        main(["--data", str(tmp_path), "--output", "o", "--preset", "tiny", "--crop-frames", "8", "--dry-run"])
    with pytest.raises(ConfigError, match="crop_frames"):
        train(tmp_path / "audio", tmp_path / "vae", "--dry-run", "--crop-frames", "0")
    with pytest.raises(SystemExit):
        main(["--modality", "video", "--data", "d", "--output", "o"])


def test_flags_reach_the_config(monkeypatch, tmp_path):
    import jobs.train_vae as job

    seen = {}

    def capture(cls, args, flags=None, base=None):
        from jobs.cli import resolve_config

        seen["cfg"] = resolve_config(cls, args, flags, base)
        raise SystemExit(0)

    monkeypatch.setattr(job, "resolve_config", capture)
    with pytest.raises(SystemExit):
        main(["--modality", "audio", "--data", "d", "--output", "o", "--preset", "tiny", "--kl-weight", "1e-5",
              "--disc-start", "7", "--crop-frames", "48", "--lr", "2e-4", "--batch-size", "3",
              "--set", "model.channels=16", "--set", "loss.adversarial_weight=0.25"])
    cfg = seen["cfg"]
    assert isinstance(cfg, TrainAudioVAEConfig)
    assert (cfg.loss.kl_weight, cfg.loss.disc_start, cfg.loss.adversarial_weight) == (1e-5, 7, 0.25)
    assert (cfg.crop_frames, cfg.lr, cfg.batch_size) == (48, 2e-4, 3)
    assert (cfg.model.channels, cfg.model.channel_mult, cfg.model.kernel_size) == (16, (1, 2), 3)  # tiny + override
    with pytest.raises(SystemExit):
        main(["--data", "d", "--output", "o", "--lr", "2e-4"])  # image: unchanged config class, the shared flags
    assert type(seen["cfg"]).__name__ == "TrainVAEConfig" and seen["cfg"].lr == 2e-4


def test_decoding_resamples_mixes_and_reports(tmp_path, monkeypatch):
    tones = write_tones(tmp_path / "audio")
    cfg = from_dict(TrainAudioVAEConfig, {"data": str(tmp_path / "audio"), "output": "o"})
    sources = find_sources(cfg)
    monkeypatch.chdir(tmp_path)  # a relative --data gives absolute paths (workers have their own working directory)
    assert find_sources(from_dict(TrainAudioVAEConfig, {"data": "audio", "output": "o"})) == sources
    assert sources.kind == "files" and [p[len(str(tmp_path / "audio")) + 1:] for p in sources.items] == [
        "0_bad_header.wav", "1_tone.wav", "2_empty.wav", "3_tone.wav", "4_garbage.mp3", "5_tone.flac", "6_short.wav",
        "7_nested/tone.wav"]
    clips, skipped = load_clips(sources, sources.items, MelConfig())
    assert [(Path(s["source"]).name, s["reason"].split(":")[0]) for s in skipped] == [
        (name, "ValueError") for name in BAD]
    # every clip at 16 kHz, whatever its rate and channels: n // 256 + 1 frames of 80 bins
    frames = [c.shape for c in clips]
    assert frames == [(80, frames_for(int(16000 * s))) for s in (2.0, 1.5, 1.2, 1.6)]
    # a 22.05 kHz stereo tone gives the mel of the same tone at 16 kHz, mono (the mean of the channels)
    t = np.arange(int(16000 * 1.5)) / 16000
    reference = file_mel_of(tmp_path, 0.75 * 0.4 * np.sin(2 * np.pi * 440 * t), 16000)
    got, want = clips[1][:, 2:-2], reference[:, 2:-2]  # (the edges see the resampler's filter)
    assert torch.equal(got.argmax(0), want.argmax(0))  # the tone's bin in every frame
    loud = want > want.max() - 3  # the tone, not the noise floor the reference lacks
    assert (got - want)[loud].abs().max() < 0.1
    # another sample rate in the VAE's mel config: the files are resampled to it
    other = MelConfig(sample_rate=8000, f_max=4000.0)
    assert file_mel(tones["1_tone.wav"], other).shape == (80, frames_for(16000))


def file_mel_of(tmp_path: Path, wave: np.ndarray, rate: int) -> torch.Tensor:
    path = tmp_path / "reference.wav"
    path.write_bytes(wav_bytes(wave.astype(np.float32), rate, subtype="FLOAT"))
    return file_mel(str(path), MelConfig())


def test_history_is_json_beside_the_weights(tmp_path):
    from jobs.audio_vae_training import write_history

    cfg = from_dict(TrainAudioVAEConfig, {"data": "d", "output": str(tmp_path)})
    write_history(cfg, {"steps": [{"step": 1, "rec_l1": 2.0}]})
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == read_history(str(tmp_path))


def test_nothing_decodable_is_a_config_error(tmp_path):
    """Every file bad: the workers raise ConfigError, which the driver gives as it is (not Ray's wrapped traceback)."""
    import ray.train
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from jobs.audio_vae_training import require_clips, worker_config_error

    write_tones(tmp_path / "all")
    cfg = from_dict(TrainAudioVAEConfig, {"data": str(tmp_path / "all"), "output": "o"})
    sources = find_sources(cfg)
    clips, skipped = load_clips(sources, [p for p in sources.items if Path(p).name in BAD], MelConfig())
    first = r"no decodable audio in .*all: 4 source\(s\) skipped \(first: .*0_bad_header"
    with pytest.raises(ConfigError, match=first) as raised:
        require_clips(clips, skipped, cfg.data)
    require_clips(*load_clips(sources, sources.items[:2], MelConfig()), cfg.data)  # one good clip is enough
    wrapped = UserExceptionWithTraceback(raised.value, "Traceback …")
    failure = ray.train.WorkerGroupError("Training failed due to worker errors", {0: wrapped, 1: wrapped})
    assert str(worker_config_error(failure)) == str(raised.value)
    other = ray.train.WorkerGroupError("boom", {0: UserExceptionWithTraceback(RuntimeError("x"), "tb")})
    assert worker_config_error(other) is None
