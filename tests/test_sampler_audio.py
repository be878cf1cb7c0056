"""The Sampler on an audio model (paper §5.2): prompts → waveforms of the asked duration, deterministic per seed."""

from __future__ import annotations

import numpy as np
import pytest

from models.audio_vae import AudioVAE
from models.config_io import ConfigError
from models.sampler import GenerationRequest, Sampler
from models.tiny import make_tiny_audio_vae, make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-sampler")
    te = make_tiny_text_encoder(root / "te")
    audio = make_tiny_model_folder(root / "audio", te, make_tiny_audio_vae(root / "mel-vae"), preset_name="tiny-audio",
                                   sampler={"steps": 2, "solver": "euler"})
    image = make_tiny_model_folder(root / "image", te, make_tiny_vae(root / "vae"), sampler={"steps": 1})
    return {"audio": audio, "image": image, "mel-vae": str(root / "mel-vae")}


@pytest.fixture(scope="module")
def sampler(folders):
    return Sampler.from_pretrained(folders["audio"], config={"batch_size": 2})


def test_a_clip_has_the_asked_duration_at_the_vaes_rate(sampler):
    (result,) = sampler.generate([GenerationRequest("a low hum", duration=0.75, seed=3)])
    assert result.sample_rate == 16_000 and result.audio.shape == (12_000,) and result.audio.dtype == np.float32
    assert np.abs(result.audio).max() <= 1 and np.abs(result.audio).max() > 0
    assert result.image is None and result.mel.shape == (80, 12_000 // 256 + 1)
    assert result.latent.shape == (20, 1, 24)  # 47 mel frames → 24 latent frames, one row
    meta = result.metadata
    assert meta["duration"] == 0.75 and meta["sample_rate"] == 16_000 and "width" not in meta
    (default,) = sampler.generate([GenerationRequest("a low hum", seed=3)])
    assert default.audio.shape == (63 * 256,)  # the training length: 32 latent frames = 64 mel frames


def test_same_seed_same_samples_whatever_the_batch(sampler):
    alone = sampler.generate([GenerationRequest("a bird", duration=0.5, seed=11)])[0]
    again = sampler.generate([GenerationRequest("a bird", duration=0.5, seed=11)])[0]
    assert np.array_equal(alone.audio, again.audio)
    batched = sampler.generate([GenerationRequest("a bird", duration=0.5, seed=11),
                                GenerationRequest("rain on a roof", duration=0.5, seed=12)])
    assert np.array_equal(batched[0].audio, alone.audio)  # slot 0: bit-identical whatever slot 1 holds
    other = sampler.generate([GenerationRequest("a bird", duration=0.5, seed=12)])[0]
    assert not np.array_equal(other.audio, alone.audio)


@pytest.mark.parametrize("bad,match", [
    ({"width": 64, "height": 16}, "takes a duration in seconds, not a width"),
    ({"duration": 0}, "positive number of seconds"),
    ({"duration": 31.0}, "exceeds the maximum of 30.0 s"),
])
def test_bad_audio_requests_fail_before_work(sampler, bad, match):
    with pytest.raises(ValueError, match=match):
        sampler.generate([GenerationRequest("x", **bad)])


def test_modalities_do_not_mix(folders):
    image = Sampler.from_pretrained(folders["image"])
    with pytest.raises(ValueError, match="an image model takes a width and height, not a duration"):
        image.generate([GenerationRequest("a red square", duration=1.0)])
    with pytest.raises(ValueError, match="an image model decodes with ImageVAE, got AudioVAE"):
        Sampler.from_pretrained(folders["image"], vae=AudioVAE.from_pretrained(folders["mel-vae"]))


def test_generate_job_writes_clips_readable_at_the_asked_duration_and_rate(folders, tmp_path):
    import soundfile

    from jobs.generate import main

    out = tmp_path / "clips"
    argv = ["--model", folders["audio"], "--prompt", "a low hum", "--prompt", "a bird", "--duration", "0.5",
            "--seed", "7", "--out", str(out)]
    assert main(argv) == 0
    clips = sorted(out.glob("*.wav"))
    assert [c.name for c in clips] == ["000000_7.wav", "000001_8.wav"]
    for clip in clips:
        samples, rate = soundfile.read(clip)
        assert rate == 16_000 and samples.shape == (8_000,)
        assert clip.with_suffix(".png").exists() and clip.with_suffix(".json").exists()
    first = clips[0].read_bytes()
    assert main(argv + ["--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "000000_7.wav").read_bytes() == first  # same seed, same bytes
    assert main(argv[:-2] + ["--out", str(tmp_path / "flac"), "--format", "flac"]) == 0
    samples, rate = soundfile.read(tmp_path / "flac" / "000000_7.flac")
    assert rate == 16_000 and samples.shape == (8_000,)
    with pytest.raises(ConfigError, match="give one of --size"):
        main(argv + ["--size", "64x64"])


def test_a_dual_encoder_model_reads_the_structured_prompt(tmp_path):
    """Paper §5.2: the audio model's CLAP part reads the prompt, its T5 part the structured prompt (default: the
    prompt); a model with one text encoder refuses a structured prompt rather than ignore it."""
    from models.tiny import make_tiny_text_encoder_stack

    stack = make_tiny_text_encoder_stack(tmp_path / "dual")
    folder = make_tiny_model_folder(tmp_path / "model", stack, make_tiny_audio_vae(tmp_path / "mel-vae"),
                                    preset_name="tiny-audio", sampler={"steps": 2, "solver": "euler"})
    dual = Sampler.from_pretrained(folder)
    assert dual.text_encoder.kind == "stack"

    def clip(**kw):
        return dual.generate([GenerationRequest("a tone at 440 hertz", duration=0.5, seed=2, **kw)])[0]

    plain, same, tagged = clip(), clip(structured_prompt="a tone at 440 hertz"), clip(structured_prompt="genre: jazz")
    assert np.array_equal(plain.audio, same.audio)  # the default structured prompt is the prompt itself
    assert not np.array_equal(plain.audio, tagged.audio)
    assert tagged.metadata["structured_prompt"] == "genre: jazz" and "structured_prompt" not in plain.metadata


def test_a_single_encoder_refuses_a_structured_prompt(sampler):
    with pytest.raises(ValueError, match="reads only the prompt"):
        sampler.generate([GenerationRequest("x", duration=0.5, structured_prompt="genre: jazz")])
