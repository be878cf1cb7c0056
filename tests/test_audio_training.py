"""Audio training and generation guarantees, with tiny random models (mel VAE, a T5 text encoder — the music model's
kind, read from its folder —, ``tiny-audio`` Next-DiT) on one data set prepared once for the module: a prompt file for
an audio model runs as a Ray Data job and writes one WAV per prompt at its duration; a t2a run on 2 workers killed
after its checkpoint resumes with every sample exactly once per epoch (the image guarantee of tests/test_train_ray.py,
same helpers), and its export names the mel VAE and the T5 encoder and generates the same WAV bytes for the same seed;
LoRA on the audio model exports an adapter that ``jobs.generate --model BASE --adapter ADAPTER`` samples WAV clips
with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_ray import (
    assert_exactly_once,
    expected_steps,
    fit,
    make_config,
    recorded_steps,
    reference_run,
    run_catalog,
)

RATE = 16_000
CLIPS = 12  # one 1-s bucket; micro-batch 2 on 2 workers: 3 steps an epoch
AUDIO = {"preset": "tiny-audio"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """12 captioned 1.2-s tones through jobs.prepare (mel-VAE latents, caption features), and a random
    ``tiny-audio`` model folder whose metadata names the same text encoder and mel VAE (the LoRA base)."""
    import soundfile

    from jobs.prepare import main as prepare
    from models.tiny import make_tiny_audio_vae, make_tiny_model_folder, make_tiny_t5

    root = tmp_path_factory.mktemp("audio-training")
    clips = root / "clips"
    clips.mkdir()
    t = np.arange(int(1.2 * RATE)) / RATE
    for i in range(CLIPS):  # distinct clips (curation drops duplicates): four pitches, three detunings each
        freq = [220, 330, 440, 550][i % 4] + 10 * (i // 4)
        soundfile.write(clips / f"tone_{i:02d}.wav", 0.5 * np.sin(2 * np.pi * freq * t), RATE)
        (clips / f"tone_{i:02d}.json").write_text(json.dumps({"caption": f"a tone at {freq} hertz"}))
    vae, text_encoder = make_tiny_audio_vae(root / "mel-vae"), make_tiny_t5(root / "t5")
    data = root / "prepared"
    assert prepare(["--input", str(clips), "--output", str(data), "--set", "read.modalities=[audio]",
                    "--set", f"encode.audio_vae={vae}", "--set", f"encode.text_encoder={text_encoder}",
                    "--set", "bucket.audio_durations_s=[1.0]", "--set", "filter.min_duration_s=0.5",
                    "--set", "write.samples_per_shard=4"]) == 0
    base = make_tiny_model_folder(root / "base", text_encoder, vae, preset_name="tiny-audio")
    return {"data": str(data), "vae": vae, "text_encoder": text_encoder, "base": base, "root": root}


def wav_samples(path: Path) -> int:
    import soundfile

    samples, rate = soundfile.read(path)
    assert rate == RATE
    return samples.shape[0]


def test_a_prompt_file_for_an_audio_model_runs_as_a_ray_data_job(prepared, tmp_path):
    from jobs.generate import main as generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("a tone at 220 hertz\n" + json.dumps({"prompt": "a tone at 440 hertz", "seed": 42,
                                                               "duration": 0.5}) + "\na tone at 550 hertz\n")
    common = ["--model", prepared["base"], "--duration", "0.75", "--steps", "1", "--seed", "7", "--log-level",
              "WARNING"]
    out = tmp_path / "ray"
    assert generate([*common, "--prompt-file", str(prompts), "--set", "ray.batch_size=2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.{ext}" for stem in ("000000_7", "000001_42", "000002_9")
                                                     for ext in ("json", "png", "wav")]
    assert [wav_samples(out / f"{stem}.wav") for stem in ("000000_7", "000001_42", "000002_9")] == [12_000, 8_000,
                                                                                                    12_000]
    meta = json.loads((out / "000001_42.json").read_text())
    assert meta["duration"] == 0.5 and meta["prompt"] == "a tone at 440 hertz" and meta["sample_rate"] == RATE
    # the same seed through the local path gives the same bytes as through the actor pool
    assert generate([*common, "--prompt", "a tone at 220 hertz", "--out", str(tmp_path / "local")]) == 0
    assert (tmp_path / "local" / "000000_7.wav").read_bytes() == (out / "000000_7.wav").read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
class FailOnce:
    """Test-side step callback: the last rank raises after step ``FAIL_AFTER`` once per run (a marker file in the run
    folder keeps the restarted attempt going)."""

    def __call__(self, event) -> None:
        marker = Path(event.run_dir) / f"injected-failure-{event.step}"
        if event.step == FAIL_AFTER and event.rank == event.world - 1 and not marker.exists():
            marker.write_text(f"rank {event.rank} failed after step {event.step}\n")
            raise RuntimeError(f"injected failure after step {event.step} on rank {event.rank}")


FAIL_AFTER = 4  # one step past the checkpoint at 3, in the second epoch


def loop_failing_once(loop_config):
    from jobs.training.config import TrainJobConfig
    from jobs.training.loop import run_worker
    from models.config_io import from_dict

    run_worker(from_dict(TrainJobConfig, loop_config["config"]), callbacks=[FailOnce()])


def test_a_killed_audio_run_resumes_exactly_once(prepared, tmp_path):
    """2 workers, 6 steps = 2 epochs of the 12 clips, checkpoint at 3; rank 1 dies after step 4: Ray Train restarts
    the group, both resume from step 3, step 4 is redone with the same samples, every clip is seen exactly once per
    epoch, and the losses follow the single-process reference over the same data order."""
    from jobs.training.data import ShardReader
    from jobs.training.driver import build_trainer, validate
    from jobs.training.metrics import read_history

    steps = 6
    # sync upload: checkpoint 3 is in storage before step 4 runs, so the restart resumes from it (with the default
    # background upload it may still be uploading when rank 1 dies: tests/test_train_ray.py covers that case)
    cfg = make_config(prepared, tmp_path, "fault", steps=steps, model=AUDIO, data={"micro_batch": 2},
                      train={"ckpt_every": 3}, run={"checkpoint_upload": "sync"})
    validate(cfg)
    assert (cfg.train.task, cfg.data.modality) == ("t2a", "audio")
    trainer = build_trainer(cfg)
    trainer.train_loop_per_worker = loop_failing_once
    result = trainer.fit()
    assert result.error is None and result.metrics["step"] == steps
    run_dir = tmp_path / "fault"
    assert (run_dir / f"injected-failure-{FAIL_AFTER}").exists()
    files = sorted((run_dir / "samples").glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0]))
    ranks = [(int(f.stem.rsplit("rank", 1)[1]), [json.loads(line) for line in f.read_text().splitlines()])
             for f in files]
    # two attempts × two ranks; the restart resumed from the checkpoint at 3 and redid step 4 with the same samples
    assert [[row["step"] for row in rows] for _, rows in ranks] == [[1, 2, 3, 4]] * 2 + [[4, 5, 6]] * 2
    assert ({rank: rows[-1]["keys"] for rank, rows in ranks[:2]}
            == {rank: rows[0]["keys"] for rank, rows in ranks[2:]})
    recorded = recorded_steps(run_dir)
    assert_exactly_once(recorded, expected_steps(cfg, [2] * steps))
    catalog = run_catalog(cfg)
    reader = ShardReader(catalog, 8)
    keys = {reader.sample(s.index, i)["key"] for s in catalog.shards for i in range(s.samples)}
    assert len(keys) == CLIPS
    epochs: dict[int, list[str]] = {}
    for row in recorded.values():
        epochs.setdefault(row["epoch"], []).extend(row["keys"])
    assert len(epochs) == 2
    for seen in epochs.values():  # every clip once per epoch
        assert len(seen) == CLIPS and set(seen) == keys
    ref_losses, _, _, _ = reference_run(cfg, [2] * steps)
    np.testing.assert_allclose([r["loss"] for r in read_history(str(run_dir))], ref_losses, rtol=1e-4, atol=1e-5)

    # the music model it trained: the export names its mel VAE and T5 encoder, and generates WAVs deterministically
    from jobs.export import main as export
    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint, read_modality

    model = tmp_path / "music"
    assert export([str(run_dir), str(model)]) == 0
    mcfg, _, meta = read_checkpoint(str(model), tensors=False)
    assert read_modality(str(model)) == "audio" and mcfg.trained_sides == (1, 1, 32)  # 63 mel frames → 32 latent
    assert meta["vae"]["path"] == prepared["vae"] and meta["text_encoder"]["kind"] == "t5"
    argv = ["--model", str(model), "--prompt", "a tone at 440 hertz", "--duration", "0.75", "--seed", "5",
            "--steps", "2", "--log-level", "WARNING"]
    assert generate(argv + ["--out", str(tmp_path / "clips")]) == 0
    assert wav_samples(tmp_path / "clips" / "000000_5.wav") == 12_000
    assert generate(argv + ["--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "000000_5.wav").read_bytes() == (tmp_path / "clips" / "000000_5.wav").read_bytes()


def test_lora_on_the_audio_model_exports_an_adapter_that_generates(prepared, tmp_path):
    """LoRA (model.init_from = the tiny-audio base, rank 4) on one worker: only the adapters train, the export is a
    peft adapter folder holding exactly the trained adapter weights, and jobs.generate --model BASE --adapter ADAPTER
    writes a WAV of the asked duration that differs from the base model's for the same seed."""
    import torch
    from peft import PeftModel

    from jobs.export import main as export
    from jobs.generate import main as generate
    from jobs.training.checkpointing import consolidate, latest_checkpoint
    from models import NextDiT

    base = prepared["base"]
    cfg = make_config(prepared, tmp_path, "lora", workers=1, steps=2, model={"init_from": base},
                      lora={"enabled": True, "rank": 4}, data={"micro_batch": 2},
                      train={"ckpt_every": 2, "record_samples": False})
    assert fit(cfg).metrics["step"] == 2
    raw, ema, _ = consolidate(latest_checkpoint(str(tmp_path / "lora")))
    assert ema is not None and all("lora_" in k for k in ema)  # only the adapters train (and have an EMA)
    adapter = tmp_path / "adapter"
    assert export([latest_checkpoint(str(tmp_path / "lora")), str(adapter)]) == 0
    assert (adapter / "adapter_config.json").exists()
    state = PeftModel.from_pretrained(NextDiT.from_pretrained(base), str(adapter)).state_dict()
    lora_keys = [k for k in raw if "lora_" in k]
    assert lora_keys and all(torch.equal(state[k], raw[k]) for k in lora_keys)
    assert any(bool(raw[k].abs().sum()) for k in lora_keys if "lora_B" in k)  # B starts at zero: it trained
    common = ["--model", base, "--prompt", "a tone at 440 hertz", "--duration", "0.5", "--steps", "1", "--seed", "3",
              "--log-level", "WARNING"]
    assert generate([*common, "--adapter", str(adapter), "--out", str(tmp_path / "tuned")]) == 0
    assert generate([*common, "--out", str(tmp_path / "plain")]) == 0
    tuned, plain = tmp_path / "tuned" / "000000_3.wav", tmp_path / "plain" / "000000_3.wav"
    assert wav_samples(tuned) == 8_000
    assert tuned.read_bytes() != plain.read_bytes()  # the adapter is applied
