"""The README's first command, shortened: the whole platform end to end on the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from jobs.demo import DemoConfig, run
from jobs.demo_data import DemoCounts
from models.checkpoint import read_checkpoint


def test_shortened_demo_runs_end_to_end(ray_cluster, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    # no wandb run per training (5-11 s of start-up each on 2 cores): its offline runs are tested in test_train.py
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # long enough to learn colour from the caption in ≈ 2.5 min on 2 cores: 400 steps at twice the default rate, with
    # 16-image micro-batches (batch_tokens 1024), which cost about what 8 do (per-step overhead dominates the tiny model)
    # and took the fidelity from 0.54–0.79 to 0.75–1.0 (AMD EPYC, 2 cores; 300 steps gave 0.71)
    # the audio model keeps the demo's settings (350 steps, its dual text encoder) on a third of its tones, 4 of each
    # pitch: it learns the pitch much sooner than the image model learns the colour
    # the points model trains 150 of the demo's 200 steps on half its solids (8 of each) and is asked for 4 clouds per
    # solid
    # each model is evaluated every 100 steps while it trains, and at its last (the demo: every 200)
    cfg = DemoConfig(out=str(out), counts=DemoCounts(images=96, tones=16, solids=24), steps=400, lr=4e-3,
                     batch_tokens=1024, seeds_per_prompt=2, sample_steps=10, audio_steps=150, points_steps=150,
                     points_seeds_per_prompt=4, eval_every=100)
    report = run(cfg)

    # every modality curated, every corrupt file rejected with a reason, the job did not fail
    manifest = pq.read_table(out / "curated" / "manifest.parquet").to_pylist()
    assert {row["modality"] for row in manifest} == {"image", "audio", "points"}
    rejects = pq.read_table(out / "curated" / "rejects.parquet").to_pylist()
    rejected_sources = " ".join(row["source"] for row in rejects)
    for name in report["corrupt_inputs"]:
        assert name.split("/")[-1] in rejected_sources, name
    # trained, exported, served: two images per prompt (12 prompts) came back over HTTP and were scored
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "ema.safetensors").exists()
    assert report["images"] == 24
    # the model follows the prompt: the colour it names dominates at least half of the images, twice chance (1 in 4
    # colours). One that ignores the prompt scores chance at most (same seeds, same images for every prompt) and random
    # guesses reach 12 of 24 with probability < 1 %; trained, it scores 0.75–1.0, a margin that does not depend on
    # bitwise results (float sums differ between CPUs, Ray's data order between runs)
    assert report["chance"] == 0.25
    assert report["prompt_fidelity"] >= 0.5, report["per_image"]
    assert report["loss_last"] < report["loss_first"]
    # the audio model, served by the same app: six 1-s clips per pitch came back over HTTP as WAVs, and the pitch the
    # prompt names dominates their spectrum at least half the time, twice chance (1 in 4 pitches; random guesses reach
    # 12 of 24 with probability < 1 %). Trained, it scores 1.0; the mel VAE alone keeps every pitch (the ceiling).
    assert (out / "model-audio" / "model.safetensors").exists()
    _, _, audio_meta = read_checkpoint(str(out / "model-audio"), tensors=False)
    # the export names the dual encoder it trained through
    assert Path(audio_meta["text_encoder"]["path"]) == (out / "audio-text-encoder").resolve()
    assert report["clips"] == 24 and report["audio_chance"] == 0.25
    assert report["audio_fidelity"] >= 0.5, report["per_clip"]
    assert report["mel_vae_round_trip"]["fidelity"] == 1.0, report["mel_vae_round_trip"]
    assert report["audio_loss_last"] < report["audio_loss_first"]
    wavs = sorted((out / "report" / "audio").glob("*.wav"))
    assert len(wavs) == 24 and all(w.stat().st_size > 16_000 for w in wavs)  # 1 s of 16-bit samples at 16 kHz
    # the points model, served by the same app: four 1024-point clouds per solid (4× the 256 it trained on) came back
    # over HTTP as PLY files, and the solid the prompt names is the nearest (Chamfer distance) at least half the time.
    # One that ignores its prompt scores exactly chance (the same seeds give the same clouds for every prompt: each
    # cloud is nearest one solid); trained so, it scored 1.0 (8 clouds per solid)
    assert (out / "model-points" / "model.safetensors").exists()
    points_cfg, _, points_meta = read_checkpoint(str(out / "model-points"), tensors=False)
    assert points_cfg.trained_sides == (1, 1, 256) and "vae" not in points_meta  # trained at 256, served at 1024
    assert Path(points_meta["text_encoder"]["path"]) == (out / "points-text-encoder").resolve()
    assert report["clouds"] == 12 and report["point_chance"] == 1 / 3
    assert report["point_fidelity"] >= 0.5, report["per_cloud"]
    assert all(c["points"] == 1024 for c in report["per_cloud"])
    assert report["points_loss_last"] < report["points_loss_first"]
    assert len(list((out / "report" / "points").glob("*.ply"))) == 12
    # the image model's in-training evaluation (docs/training.md#in-training-evaluation): every 100 of its 400 steps
    # the EMA weights drew one prompt per colour; the run's storage holds the samples and the curve, the report shows
    # the curve and the last grid
    assert [(r["step"], r["samples"]) for r in report["eval"]] == [(100, 4), (200, 4), (300, 4), (400, 4)]
    assert all(0 <= r["colour_fidelity"] <= 1 and r["latent_fd"] >= 0 for r in report["eval"])
    evaluation = out / "runs" / "demo" / "eval"
    assert (evaluation / "curve.png").exists() and len(list((evaluation / "step_00000400").glob("*.png"))) == 5
    # the audio and point models are evaluated the same way inside their 2-worker ZeRO-3 fits, every 100 of their 150
    # steps and at the last: one clip per pitch (pitch fidelity, latent_fd), one cloud per solid (solid fidelity,
    # MMD-CD and COV-CD against training clouds)
    for name, samples, numbers in (("audio", 4, {"pitch_fidelity", "latent_fd"}),
                                   ("points", 3, {"solid_fidelity", "mmd_cd", "cov_cd"})):
        rows = report[f"eval_{name}"]
        assert [(r["step"], r["samples"]) for r in rows] == [(100, samples), (150, samples)], rows
        assert all(numbers <= set(r) for r in rows), rows
        assert len(list((out / "runs" / f"demo-{name}" / "eval" / "step_00000150").glob("*.json"))) == samples
    assert 0 <= report["eval_points"][-1]["cov_cd"] <= 1 and report["eval_points"][-1]["mmd_cd"] > 0
    assert len(list((out / "runs" / "demo-audio" / "eval" / "step_00000150").glob("*.wav"))) == 4
    for name in ("samples.png", "mel.png", "points.png", "loss.png", "report.json", "report.md", "eval_curve.png",
                 "eval_grid.png", "eval_curve_audio.png", "eval_curve_points.png"):
        assert (out / "report" / name).stat().st_size > 0
    saved = json.loads((out / "report" / "report.json").read_text())
    assert set(saved["timings_s"]) >= {"prepare (Ray Data)", "train (Ray Train + DeepSpeed ZeRO-3)",
                                       "train audio (Ray Train + DeepSpeed ZeRO-3)",
                                       "train points (Ray Train + DeepSpeed ZeRO-3)", "total"}
    assert saved["audio_fidelity"] == report["audio_fidelity"] and len(saved["per_clip"]) == 24
    assert "Audio fidelity" in (markdown := (out / "report" / "report.md").read_text()) and "Point fidelity" in markdown
    assert "## In-training evaluation" in markdown and "](eval_curve.png)" in markdown
