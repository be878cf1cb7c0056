"""Text-to-audio end to end (paper §5.2) with the paper's dual text encoder, tiny random models: jobs.prepare encodes
captioned clips with a mel VAE and precomputes the features of a stack of CLAP on the caption and T5 on the structured
caption (docs/design-decisions.md#the-dual-text-encoder), and jobs.generate, from a model folder that names the stack,
writes WAV clips of the asked duration and rate, the same bytes for the same seed, reading the structured prompt.
Training through the stack (online, on 2 ZeRO-3 workers) and its export: the demo's audio model, tests/test_demo.py.
Music (one T5 encoder, ``--text-encoder T5``) end to end: tests/test_audio_training.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

RATE = 16_000
PITCHES = [220, 330, 440, 550]


def write_tones(clips, structured: bool = False) -> None:
    """Twelve 1.2-s tones of four pitches, captioned with their pitch (and, if asked, a structured caption)."""
    import soundfile

    clips.mkdir()
    for i in range(12):
        freq = PITCHES[i % 4]
        t = np.arange(int(1.2 * RATE)) / RATE
        detune = 0.5 * (i // 4)  # distinct files: jobs.prepare drops exact duplicates
        soundfile.write(clips / f"tone_{i:02d}.wav", 0.5 * np.sin(2 * np.pi * (freq + detune) * t), RATE)
        meta = {"caption": f"a tone at {freq} hertz"}
        if structured:
            meta["structured_caption"] = {"pitch": freq, "timbre": "sine"}
        (clips / f"tone_{i:02d}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def dual(tmp_path_factory, ray_cluster):
    """Audio: the CLAP + T5 stack; jobs.prepare precomputes features from caption and structured caption. The model
    folder is a random tiny-audio Next-DiT naming the stack and the mel VAE, as jobs.export writes one: training
    through the stack online, structured captions included, is the demo's audio model on 2 ZeRO-3 workers
    (tests/test_demo.py) and tests/test_train.py's online-caption test; here what reads the folder is checked."""
    from jobs.prepare import main as prepare
    from models.tiny import make_tiny_audio_vae, make_tiny_model_folder, make_tiny_text_encoder_stack

    root = tmp_path_factory.mktemp("dual-e2e")
    stack = make_tiny_text_encoder_stack(root / "dual")
    write_tones(root / "clips", structured=True)
    vae = make_tiny_audio_vae(root / "mel-vae")
    assert prepare(["--input", str(root / "clips"), "--output", str(root / "prepared"), "--set",
                    "read.modalities=[audio]", "--set", f"encode.audio_vae={vae}", "--set",
                    f"encode.text_encoder={stack}", "--set", "bucket.audio_durations_s=[1.0]",
                    "--set", "filter.min_duration_s=0.5", "--set", "write.samples_per_shard=4"]) == 0
    model = make_tiny_model_folder(root / "model", stack, vae, preset_name="tiny-audio")
    return {"model": model, "stack": stack, "root": root}


def test_the_dual_encoder_reads_caption_and_structured_caption_in_prepare_and_in_training(dual):
    import soundfile

    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint
    from models.text_encoder import TextEncoder
    from pipelines.shards import iter_samples, list_shards, shard_url

    _, _, meta = read_checkpoint(dual["model"], tensors=False)
    assert meta["text_encoder"]["path"] == dual["stack"]
    stack = TextEncoder.from_pretrained(dual["stack"])
    prepared = str(dual["root"] / "prepared")
    (shard, *_) = list_shards(prepared, modality="audio")
    sample = next(iter_samples(shard_url(prepared, shard["path"])))
    structured = sample["meta"]["structured_caption"]
    assert structured == '{"pitch": %d, "timbre": "sine"}' % int(sample["caption"].split()[3])
    feats, mask = stack.encode([sample["caption"]], [structured])
    np.testing.assert_allclose(np.asarray(sample["text_features"], np.float32), feats[0, : int(mask.sum())].numpy(),
                               atol=2e-3)  # stored as float16
    out = dual["root"] / "out"
    argv = ["--model", dual["model"], "--prompt", "a tone at 330 hertz", "--duration", "0.5", "--seed", "1",
            "--steps", "2"]
    assert generate(argv + ["--out", str(out / "plain")]) == 0
    assert generate(argv + ["--structured-prompt", '{"pitch": 330, "timbre": "sine"}', "--out", str(out / "tags")]) == 0
    assert generate(argv + ["--out", str(out / "again")]) == 0  # the same seed, the same bytes
    assert (out / "again" / "000000_1.wav").read_bytes() == (out / "plain" / "000000_1.wav").read_bytes()
    plain, rate = soundfile.read(out / "plain" / "000000_1.wav")
    tagged, _ = soundfile.read(out / "tags" / "000000_1.wav")
    assert rate == RATE and plain.shape == tagged.shape == (8_000,) and not np.array_equal(plain, tagged)
    sidecar = json.loads((out / "tags" / "000000_1.json").read_text())
    assert sidecar["structured_prompt"] == '{"pitch": 330, "timbre": "sine"}'
