"""AudioLDM's layout (docs/official-formats.md#audioldm-layout) and the HiFi-GAN vocoder (docs/sampling.md#audio): a
diffusers mel AutoencoderKL with 2D latents (C, F, T) next to our 1D mel VAE, a SpeechT5HifiGan checked against the
VAE's mel features, which vocoder a Sampler runs, and curation / training / generation on 2D audio latents — tiny
random models on the CPU (models/tiny.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.audio import AUDIOLDM, DIFFUSERS, OURS, check_audio_latents, find_audio_vae, load_audio_vae
from models.audio_vae import AudioVAE
from models.audioldm import AUDIOLDM_MEL, MEL_AUTOENCODER_FORMAT, MEL_FILE, AudioLDMVAE
from models.config_io import ConfigError, to_dict
from models.formats import CheckpointError
from models.mel import MelConfig, samples_for
from models.presets import preset
from models.sampler import GenerationRequest, Sampler
from models.tiny import (
    make_tiny_audio_vae,
    make_tiny_audioldm,
    make_tiny_model_folder,
    make_tiny_text_encoder,
    make_tiny_vae,
    make_tiny_vocoder,
)
from models.vocoder import GRIFFIN_LIM, HIFIGAN, GriffinLim, HifiGan, load_vocoder
from pipelines import constants as C


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("audioldm")
    te = make_tiny_text_encoder(root / "te")
    audioldm = make_tiny_audioldm(root / "audioldm")
    steps = {"steps": 2, "solver": "euler"}
    return {
        "root": root, "te": te, "audioldm": audioldm,
        # a tiny Next-DiT on AudioLDM latents, whose metadata names the pipeline folder as its VAE
        "model": make_tiny_model_folder(root / "model-2d", te, audioldm, preset_name="tiny-audio-2d", sampler=steps),
        # the same model naming the VAE's own folder (vae/): no vocoder comes with it
        "bare": make_tiny_model_folder(root / "model-bare", te, f"{audioldm}/vae", preset_name="tiny-audio-2d",
                                       sampler=steps),
        "mel-vae": make_tiny_audio_vae(root / "mel-vae"),
        "vocoder-80": make_tiny_vocoder(root / "vocoder-80", MelConfig(), seed=1),
    }


# ---- vocoders --------------------------------------------------------------------------------------------------------
def test_hifigan_gives_hop_samples_per_frame_at_the_mel_rate(folders):
    vocoder = load_vocoder(folders["vocoder-80"], MelConfig())
    assert isinstance(vocoder, HifiGan) and vocoder.name == HIFIGAN
    assert vocoder.model.config.sampling_rate == 16_000 and np.prod(vocoder.model.config.upsample_rates) == 256
    mel = torch.randn(80, 12)
    wave = vocoder.vocode(mel)
    assert wave.shape == (12 * 256,) and wave.dtype == torch.float32 and wave.abs().max() <= 1
    assert torch.equal(vocoder.vocode(mel), wave)  # deterministic
    griffin = load_vocoder(GRIFFIN_LIM, MelConfig())
    assert isinstance(griffin, GriffinLim) and load_vocoder(None, MelConfig()).name == GRIFFIN_LIM
    assert griffin.vocode(torch.randn(80, 12)).shape == (samples_for(12),)


@pytest.mark.parametrize("mel,needle", [
    (MelConfig(n_mels=64), "model_in_dim 80 ≠ n_mels 64"),
    (MelConfig(sample_rate=22_050), "sampling_rate 16000 ≠ sample_rate 22050"),
    (MelConfig(hop_length=160), "the product of upsample_rates [16, 4, 4] 256 ≠ hop_length 160"),
])
def test_a_vocoder_of_other_features_is_refused_naming_the_mismatch(folders, mel, needle):
    with pytest.raises(ConfigError, match="does not fit the mel VAE's features") as err:
        load_vocoder(folders["vocoder-80"], mel)
    assert needle in str(err.value) and folders["vocoder-80"] in str(err.value)


# ---- the AudioLDM VAE ------------------------------------------------------------------------------------------------
def test_audioldm_vae_latents_are_channels_by_frequency_rows_by_frames(folders):
    vae = load_audio_vae(folders["audioldm"])
    assert isinstance(vae, AudioLDMVAE) and vae.mel == AUDIOLDM_MEL
    assert (vae.latent_channels, vae.latent_rows, vae.config.downsample) == (8, 16, 4)
    assert vae.config.scaling_factor == pytest.approx(0.9227914214134216)
    mel = torch.randn(2, 64, 101)  # 1 s at hop 160: 101 frames, padded to 104
    z = vae.encode(mel, sample=False)
    assert z.shape == (2, 8, 16, 26) and vae.latent_frames(101) == 26
    assert torch.equal(z, vae.encode(mel, sample=False))
    one = torch.Generator().manual_seed(3)
    assert torch.equal(vae.encode(mel, generator=one), vae.encode(mel, generator=torch.Generator().manual_seed(3)))
    assert vae.decode(z, frames=101).shape == (2, 64, 101) and vae.decode(z).shape == (2, 64, 104)
    # the padding is silence: a clip and its silence-padded version encode alike up to the padded frames
    padded = torch.nn.functional.pad(mel, (0, 3), value=AUDIOLDM_MEL.silence)
    assert torch.equal(vae.encode(padded, sample=False), z)
    with pytest.raises(ValueError, match="64 mel bins"):
        vae.encode(torch.randn(1, 80, 10))
    with pytest.raises(ValueError, match="8 channels × 16 frequency rows"):
        vae.decode(torch.randn(1, 8, 26))
    with pytest.raises(ValueError, match="cannot give 105"):
        vae.decode(z, frames=105)


def test_load_audio_vae_tells_the_three_folder_kinds_apart(folders, tmp_path):
    root = folders["audioldm"]
    kinds = {path: find_audio_vae(path) for path in (folders["mel-vae"], f"{root}/vae", root)}
    assert [(f.kind, f.vocoder) for f in kinds.values()] == [(OURS, None), (DIFFUSERS, None),
                                                            (AUDIOLDM, f"{root}/vocoder")]
    assert kinds[root].vae == f"{root}/vae"
    assert isinstance(load_audio_vae(folders["mel-vae"]), AudioVAE)
    assert all(isinstance(load_audio_vae(p), AudioLDMVAE) for p in (f"{root}/vae", root))
    # something else: a clear error naming what was found
    with pytest.raises(CheckpointError, match="_class_name 'AutoencoderKL' .in_channels 3.: not a mel VAE"):
        find_audio_vae(make_tiny_vae(tmp_path / "image-vae"))
    with pytest.raises(FileNotFoundError, match="not a mel VAE folder"):
        find_audio_vae(str(tmp_path))
    # a diffusers mel VAE's features are AudioLDM's unless its folder's mel.json overrides them
    other = tmp_path / "other"
    shutil.copytree(f"{root}/vae", other)
    (other / MEL_FILE).write_text(json.dumps({"f_max": 7_000.0}))
    assert load_audio_vae(str(other)).mel == MelConfig(**{**to_dict(AUDIOLDM_MEL), "f_max": 7_000.0})


# ---- the Sampler -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler(folders):
    return Sampler.from_pretrained(folders["model"], config={"batch_size": 2})


def test_a_2d_audio_model_generates_clips_of_the_asked_duration_with_the_pipelines_vocoder(sampler):
    assert isinstance(sampler.vocoder, HifiGan)
    (result,) = sampler.generate([GenerationRequest("a low hum", duration=0.5, seed=3)])
    assert result.sample_rate == 16_000 and result.audio.shape == (8_000,) and result.audio.dtype == np.float32
    assert np.abs(result.audio).max() <= 1 and np.abs(result.audio).max() > 0
    assert result.mel.shape == (64, 51) and result.latent.shape == (8, 16, 13)  # 51 frames → 13 latent frames
    assert result.metadata["vocoder"] == HIFIGAN and result.metadata["sample_rate"] == 16_000
    again = sampler.generate([GenerationRequest("a low hum", duration=0.5, seed=3),
                              GenerationRequest("a bird", duration=0.5, seed=4)])
    assert np.array_equal(again[0].audio, result.audio) and not np.array_equal(again[1].audio, result.audio)
    (default,) = sampler.generate([GenerationRequest("a low hum", seed=3)])  # 16 latent frames = 64 mel frames
    assert default.audio.shape == (samples_for(64, AUDIOLDM_MEL),)


def test_a_vocoder_flag_beats_the_metadata_which_beats_the_vae_s_own(folders, tmp_path):
    def vocoder_of(model, **kwargs):
        return Sampler.from_pretrained(model, **kwargs).vocoder

    assert vocoder_of(folders["bare"]).name == GRIFFIN_LIM  # no vocoder anywhere
    assert vocoder_of(folders["model"], vocoder=GRIFFIN_LIM).name == GRIFFIN_LIM
    # the model folder's metadata names a vocoder (relative: inside the folder) — it beats the pipeline's
    model = tmp_path / "model"
    shutil.copytree(folders["model"], model)
    own = make_tiny_vocoder(model / "my-vocoder", AUDIOLDM_MEL, seed=7)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocoder": {"path": "my-vocoder"}}))
    assert vocoder_of(str(model)).model.name_or_path == own
    flagged = vocoder_of(str(model), vocoder=f"{folders['audioldm']}/vocoder")
    assert flagged.model.name_or_path == f"{folders['audioldm']}/vocoder"
    with pytest.raises(ConfigError, match="model_in_dim 80 ≠ n_mels 64"):
        vocoder_of(str(model), vocoder=folders["vocoder-80"])
    # our 1D VAE with a HiFi-GAN of its features
    ours = make_tiny_model_folder(tmp_path / "ours", folders["te"], folders["mel-vae"], preset_name="tiny-audio",
                                  sampler={"steps": 1, "solver": "euler"})
    sampler = Sampler.from_pretrained(ours, vocoder=folders["vocoder-80"])
    (result,) = sampler.generate([GenerationRequest("a bird", duration=0.5, seed=1)])
    assert result.metadata["vocoder"] == HIFIGAN and result.audio.shape == (8_000,)
    image = make_tiny_model_folder(tmp_path / "image", folders["te"], make_tiny_vae(tmp_path / "vae"))
    with pytest.raises(ValueError, match="image model: it takes no vocoder"):
        Sampler.from_pretrained(image, vocoder=folders["vocoder-80"])


def test_a_model_and_a_mel_vae_of_other_latents_do_not_mix(folders):
    check_audio_latents(preset("tiny-audio-2d"), 8, 16, "x")
    check_audio_latents(preset("tiny-audio"), 20, 1, "x")
    with pytest.raises(ConfigError, match="gives 20 latent channels; the model takes 8"):
        Sampler.from_pretrained(folders["model"], vae=load_audio_vae(folders["mel-vae"]))
    with pytest.raises(ConfigError, match=r"16 frequency rows .* no frequency axis .* \(audio-2d, tiny-audio-2d\)"):
        check_audio_latents(preset("tiny-audio", in_channels=8), 8, 16, "the VAE")
    with pytest.raises(ConfigError, match="one row of frames .* has a frequency axis .* 1D RoPE"):
        check_audio_latents(preset("tiny-audio-2d", in_channels=20), 20, 1, "the VAE")


# ---- curation and training on 2D latents -----------------------------------------------------------------------------
def test_prepare_records_and_encodes_with_the_audioldm_vae(folders):
    from pipelines.encode import AudioVaeEncode, encoder_records, run_mel
    from tests.test_pipelines_audio import audio_row, prepare_config

    root = folders["audioldm"]
    cfg = prepare_config(["x"], "y", encode={"audio_vae": root, "latent_mode": "mean", "latent_dtype": "float32"})
    record = encoder_records(cfg)[C.AUDIO_VAE]
    assert set(record) == set(C.AUDIO_VAE_RECORD_KEYS) and record["format"] == MEL_AUTOENCODER_FORMAT
    assert (record["latent_channels"], record["latent_rows"], record["downsample"]) == (8, 16, 4)
    assert run_mel({C.AUDIO_VAE: record}) == AUDIOLDM_MEL  # the run's features are the VAE's own
    rows, _ = AudioVaeEncode(to_dict(cfg), device="cpu", record=record).process_rows([audio_row(1.0)])
    assert rows[0][C.TENSOR].shape == (8, 16, 26) and rows[0][C.META]["latent"]["mel_frames"] == 101


def test_training_on_2d_latents_needs_a_2d_rope_model(tmp_path):
    from jobs.training.config import TrainJobConfig
    from jobs.training.driver import validate
    from jobs.training.tasks import make_task
    from models.config_io import from_dict
    from tests.test_train import _tiny_shards

    data = _tiny_shards(tmp_path / "audio", modality="audio", bucket="1.0s", shape=(8, 16, 26))

    def config(preset_name: str, **overrides) -> TrainJobConfig:
        return from_dict(TrainJobConfig, {"data": {"uri": str(data)}, "run": {"storage": str(tmp_path / "runs")},
                                          "model": {"preset": preset_name, "overrides": overrides}})

    cfg = config("tiny-audio-2d")
    catalog = validate(cfg, write_probe=False)
    assert cfg.model.resolved.in_channels == 8 and cfg.model.resolved.rope_axes == (0, 8, 8)
    assert cfg.model.resolved.trained_sides == (1, 16, 26)
    task = make_task(cfg, catalog, torch.device("cpu"))
    samples = [{"key": f"{i:016x}", "tensor": np.full((8, 16, 26), i, np.float16), "meta": {"member": C.LATENT_MEMBER},
                "text_features": np.zeros((3, 32), np.float16)} for i in range(2)]
    assert task.build(samples, epoch=0).x1.shape == (2, 8, 16, 26)  # (C, F, T) as it is
    with pytest.raises(ConfigError, match="latents have 8 channels; the model expects 20"):
        validate(config("tiny-audio"), write_probe=False)
    with pytest.raises(ConfigError, match="16 frequency rows .* no frequency axis"):
        validate(config("tiny-audio", in_channels=8), write_probe=False)


# ---- end to end: prepare → train → export → generate with the AudioLDM layout ------------------------------------------
def test_prepare_train_export_generate_with_the_audioldm_layout(folders, ray_cluster, tmp_path):
    import soundfile

    from jobs.export import main as export
    from jobs.generate import main as generate
    from jobs.prepare import main as prepare
    from jobs.train import main as train
    from models.checkpoint import read_checkpoint

    rate = AUDIOLDM_MEL.sample_rate
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(8):  # 1.2-s tones of four pitches, captioned with their pitch
        freq = [220, 330, 440, 550][i % 4]
        t = np.arange(int(1.2 * rate)) / rate
        soundfile.write(clips / f"tone_{i:02d}.wav", 0.5 * np.sin(2 * np.pi * freq * t), rate)
        (clips / f"tone_{i:02d}.json").write_text(json.dumps({"caption": f"a tone at {freq} hertz"}))
    data = tmp_path / "prepared"
    assert prepare(["--input", str(clips), "--output", str(data), "--set", "read.modalities=[audio]",
                    "--set", f"encode.audio_vae={folders['audioldm']}", "--set", f"encode.text_encoder={folders['te']}",
                    "--set", "bucket.audio_durations_s=[1.0]", "--set", "filter.min_duration_s=0.5",
                    "--set", "write.samples_per_shard=4"]) == 0
    from pipelines.shards import read_manifest

    manifest = read_manifest(str(data)).to_pylist()
    assert {tuple(r["shape"]) for r in manifest} == {(8, 16, 26)}  # 1 s: 101 mel frames → 26 latent frames × 16 rows
    assert json.loads(manifest[0]["vae"])["latent_rows"] == 16
    runs = tmp_path / "runs"
    assert train(["--data", str(data), "--storage", str(runs), "--workers", "1", "--preset", "tiny-audio-2d",
                  "--steps", "2", "--set", "data.micro_batch=2", "--set", "train.ckpt_every=2",
                  "--set", "logging.wandb=disabled", "--set", "logging.progress=false"]) == 0
    model = tmp_path / "model"
    assert export([str(runs / "nextdit"), str(model)]) == 0
    cfg, _, meta = read_checkpoint(str(model), tensors=False)
    assert cfg.trained_sides == (1, 16, 26) and meta["vae"]["path"] == folders["audioldm"]
    out = tmp_path / "out"
    assert generate(["--model", str(model), "--prompt", "a tone at 440 hertz", "--duration", "0.5", "--seed", "5",
                     "--steps", "2", "--out", str(out)]) == 0
    samples, got_rate = soundfile.read(out / "000000_5.wav")
    assert got_rate == rate and samples.shape == (8_000,)
    assert json.loads((out / "000000_5.json").read_text())["vocoder"] == HIFIGAN  # the pipeline's own
