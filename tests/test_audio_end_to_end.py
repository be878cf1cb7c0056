"""Text-to-audio end to end (paper §5.2), with tiny random models: jobs.prepare encodes captioned clips with a mel VAE,
jobs.train trains tiny-audio on 2 workers (t2a picked from the model), jobs.export writes a model folder that names the
mel VAE, and jobs.generate writes WAV clips of the asked duration and rate, the same bytes for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

RATE = 16_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ray_cluster):
    import soundfile

    from jobs.export import main as export
    from jobs.prepare import main as prepare
    from jobs.train import main as train
    from models.tiny import make_tiny_audio_vae, make_tiny_text_encoder

    root = tmp_path_factory.mktemp("audio-e2e")
    clips = root / "clips"
    clips.mkdir()
    for i in range(12):  # 1.2-s tones of four pitches, captioned with their pitch
        freq = [220, 330, 440, 550][i % 4]
        t = np.arange(int(1.2 * RATE)) / RATE
        soundfile.write(clips / f"tone_{i:02d}.wav", 0.5 * np.sin(2 * np.pi * freq * t), RATE)
        (clips / f"tone_{i:02d}.json").write_text(json.dumps({"caption": f"a tone at {freq} hertz"}))
    vae, text_encoder = make_tiny_audio_vae(root / "mel-vae"), make_tiny_text_encoder(root / "te")
    data = root / "prepared"
    assert prepare(["--input", str(clips), "--output", str(data), "--set", "read.modalities=[audio]",
                    "--set", f"encode.audio_vae={vae}", "--set", f"encode.text_encoder={text_encoder}",
                    "--set", "bucket.audio_durations_s=[1.0]", "--set", "filter.min_duration_s=0.5",
                    "--set", "write.samples_per_shard=4"]) == 0
    runs = root / "runs"
    assert train(["--data", str(data), "--storage", str(runs), "--workers", "2", "--preset", "tiny-audio",
                  "--steps", "4", "--set", "data.micro_batch=2", "--set", "train.ckpt_every=4",
                  "--set", "logging.wandb=disabled", "--set", "logging.progress=false"]) == 0
    model = root / "model"
    assert export([str(runs / "nextdit"), str(model)]) == 0
    return {"model": str(model), "vae": vae, "root": root}


def test_the_exported_folder_names_its_mel_vae_and_generates_wav_clips(exported):
    import soundfile

    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint, read_modality

    cfg, _, meta = read_checkpoint(exported["model"], tensors=False)
    assert cfg.modality == "audio" and cfg.trained_sides == (1, 1, 32)  # 1-s bucket: 63 mel frames → 32 latent frames
    assert meta["vae"]["path"] == exported["vae"] and read_modality(exported["model"]) == "audio"
    out = exported["root"] / "clips-out"
    argv = ["--model", exported["model"], "--prompt", "a tone at 440 hertz", "--duration", "0.75", "--seed", "5",
            "--steps", "2", "--out", str(out)]
    assert generate(argv) == 0
    samples, rate = soundfile.read(out / "000000_5.wav")
    assert rate == RATE and samples.shape == (12_000,)
    assert generate(argv[:-1] + [str(exported["root"] / "again")]) == 0
    assert (exported["root"] / "again" / "000000_5.wav").read_bytes() == (out / "000000_5.wav").read_bytes()
