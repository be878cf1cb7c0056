"""VGGish and PANNs' CNN14 from weights files in their releases' layouts (models.audio_networks), narrow and random, and
through jobs.evaluate: FAD in VGGish's space, KL with CNN14's AudioSet logits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.audio_networks import (
    Cnn14,
    VGGish,
    load_audio_classifier,
    load_audio_embeddings,
    vggish_examples,
    vggish_mel_matrix,
)
from models.tiny import make_tiny_cnn14, make_tiny_vggish


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-networks")
    return {"vggish": make_tiny_vggish(root / "vggish-tiny.pth"), "cnn14": make_tiny_cnn14(root / "cnn14-16k.pth")}


def noise(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)).astype(np.float32)


def googles_vggish_examples(wave: np.ndarray) -> np.ndarray:
    """Google's vggish_input.waveform_to_examples at 16 kHz, written out in NumPy from its mel_features.py: the
    oracle for our torch front end."""
    def frame(data, length, hop):
        count = 1 + (len(data) - length) // hop
        return np.stack([data[i * hop: i * hop + length] for i in range(count)])

    def hertz_to_mel(hz):
        return 1127.0 * np.log(1.0 + hz / 700.0)

    window = 0.5 - 0.5 * np.cos(2 * np.pi / 400 * np.arange(400))  # periodic Hann
    spectrogram = np.abs(np.fft.rfft(frame(wave.astype(np.float64), 400, 160) * window, 512))
    bins = hertz_to_mel(np.linspace(0.0, 8000.0, 257))
    edges = np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)
    weights = np.empty((257, 64))
    for i in range(64):
        lower, centre, upper = edges[i:i + 3]
        weights[:, i] = np.maximum(0.0, np.minimum((bins - lower) / (centre - lower), (upper - bins) / (upper - centre)))
    weights[0, :] = 0.0
    log_mel = np.log(spectrogram @ weights + 0.01)
    return frame(log_mel, 96, 96)


def test_vggish_front_end_is_googles(files):
    wave = noise(2.5) + 0.3 * np.sin(2 * np.pi * 440 * np.arange(40000) / 16000).astype(np.float32)
    ours = vggish_examples(torch.from_numpy(wave), vggish_mel_matrix())
    expected = googles_vggish_examples(wave)
    assert ours.shape == expected.shape == (2, 96, 64)  # 2.5 s: two whole 0.96-s examples, the rest dropped
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_vggish_file_embeds_every_0_96_s_in_torchvggishs_layout(files):
    network = load_audio_embeddings(files["vggish"])
    assert isinstance(network, VGGish) and network.id.startswith("vggish:vggish-tiny.pth@")
    clips = [noise(2.0, 1), noise(0.4, 2), noise(1.0, 3)]
    embeddings = network(clips, 16000)
    # two examples, one (a short clip is padded with silence to one example), one
    assert embeddings.shape == (4, 8) and torch.equal(embeddings, network(clips, 16000))
    # torchvggish's forward, written out from its weights: the Sequential by index, its (N, H, W, C) flatten, and
    # Google's embedding before torchvggish's final ReLU
    state = torch.load(files["vggish"], weights_only=True)
    x = vggish_examples(torch.from_numpy(clips[0]), vggish_mel_matrix())[:, None]
    for index in (0, 3, 6, 8, 11, 13):
        x = torch.relu(torch.nn.functional.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"],
                                                  padding=1))
        if index in (0, 3, 8, 13):
            x = torch.nn.functional.max_pool2d(x, 2, 2)
    x = torch.transpose(torch.transpose(x, 1, 3), 1, 2).contiguous().view(len(x), -1)
    for index in (0, 2, 4):
        x = torch.nn.functional.linear(x, state[f"embeddings.{index}.weight"], state[f"embeddings.{index}.bias"])
        x = torch.relu(x) if index < 4 else x
    torch.testing.assert_close(embeddings[:2], x, rtol=1e-5, atol=1e-6)
    # resampled to 16 kHz first: the same clip at 22.05 kHz embeds as nearly the same vectors
    at_22k = [torch.nn.functional.interpolate(torch.from_numpy(clips[0])[None, None], scale_factor=22050 / 16000,
                                              mode="linear").flatten().numpy()]
    assert network(at_22k, 22050).shape == (2, 8)


def test_cnn14_front_end_is_the_log_mel_of_its_own_stft_weights(files):
    import torchaudio

    network = load_audio_embeddings(files["cnn14"])
    assert isinstance(network, Cnn14) and (network.sample_rate, network.hop) == (16000, 160)
    wave = torch.from_numpy(noise(1.0, 4))
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, hop_length=160, f_min=50.0, f_max=8000.0, n_mels=64,
                                               power=2.0, center=True, pad_mode="reflect", norm="slaney",
                                               mel_scale="slaney")(wave)
    expected = 10 * torch.log10(torch.clamp(mel, min=1e-10)).T  # (frames, mels)
    torch.testing.assert_close(network.log_mel(wave[None])[0, 0], expected, rtol=0, atol=2e-3)


def test_cnn14_file_gives_clip_embeddings_and_multi_label_audioset_logits(files):
    embed, classify = load_audio_embeddings(files["cnn14"]), load_audio_classifier(files["cnn14"])
    assert classify.multi_label and classify.id == embed.id and classify.id.startswith("panns-cnn14:")
    clips = [noise(1.0, 5), noise(0.7, 6), noise(1.0, 7), noise(0.1, 8)]  # 0.1 s: padded to the 32 frames it needs
    embeddings, logits = embed(clips, 16000), classify(clips, 16000)
    assert embeddings.shape == (4, 16) and logits.shape == (4, 10) and bool((embeddings >= 0).all())  # after ReLU
    # clips of one length go in one batch, the others alone: each clip's vector is what it gets alone
    torch.testing.assert_close(logits[2:3], classify(clips[2:3], 16000), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeddings[1:2], embed(clips[1:2], 16000), rtol=1e-4, atol=1e-5)
    assert torch.equal(logits, classify(clips, 16000))


def test_a_file_of_another_layout_or_use_is_refused_with_its_reason(files, tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither VGGish's layout .* nor PANNs' CNN14"):
        load_audio_embeddings(str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="VGGish, which has no classifier"):
        load_audio_classifier(files["vggish"])
    state = torch.load(files["vggish"], weights_only=True)
    state["embeddings.0.weight"] = state["embeddings.0.weight"][:, :-1]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="not VGGish's layout"):
        load_audio_embeddings(str(tmp_path / "cut.pth"))
    checkpoint = torch.load(files["cnn14"], weights_only=True)
    torch.save({**checkpoint, "sampler": {"indexes": np.arange(3)}}, tmp_path / "with-sampler.pth")
    with pytest.raises(ValueError, match="pickled objects besides its tensors"):
        load_audio_classifier(str(tmp_path / "with-sampler.pth"))
    with pytest.raises(FileNotFoundError, match="no audio network weights file"):
        load_audio_embeddings(str(tmp_path / "missing.pth"))
    wide = {k: (v[:, :, : 300] if "stft" in k else v) for k, v in checkpoint["model"].items()}
    torch.save(wide, tmp_path / "fft300.pth")
    with pytest.raises(ValueError, match="STFT of 300 points"):
        load_audio_embeddings(str(tmp_path / "fft300.pth"))


def test_fad_in_vggish_space_and_kl_with_cnn14_through_the_job(files, tmp_path):
    import soundfile

    from jobs import evaluate as job

    t = np.arange(16000) / 16000
    for side, detune in (("real", 1.0), ("fake", 1.06)):
        (tmp_path / side).mkdir()
        for i, f in enumerate((220, 330, 440, 660)):
            soundfile.write(tmp_path / side / f"tone{i}.wav", 0.5 * np.sin(2 * math.pi * f * detune * t), 16000)
    argv = ["--metric", "fad,kl", "--audio-model", files["vggish"], "--classifier", files["cnn14"],
            "--set", f"stats_cache={tmp_path / 'cache'}"]
    assert job.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), *argv,
                     "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fad, kl = report["metrics"]["fad"], report["metrics"]["kl"]
    assert fad["vectors"] == "0.96-s example" and fad["fake_samples"] == 4 and fad["extractor"].startswith("vggish:")
    assert kl["mode"] == "sigmoid" and kl["pairs"] == 4 and kl["model"].startswith("panns-cnn14:")
    # (the multi-label KL sums over sigmoid outputs that are not one distribution: it has no sign of its own)
    assert fad["value"] > 0 and math.isfinite(kl["value"]) and kl["value"] != 0
    # a set against itself: FAD and KL of about 0
    assert job.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "real"), *argv,
                     "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "report.json").read_text())["metrics"]
    assert abs(same["fad"]["value"]) < 1e-6 * fad["value"] + 1e-9 and abs(same["kl"]["value"]) < 1e-9
