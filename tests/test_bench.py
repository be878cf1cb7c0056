"""The benchmarks run end to end on CPU with tiny configs and report what docs/benchmarks.md records (their speed is
never asserted here: figures come from `python -m jobs.bench …` runs, DEVELOPERS.md)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# benchmarks that start no process group, Ray cluster or process of their own run in this process, through the main()
# `python -m jobs.bench` calls: a new interpreter would spend 2-8 s importing torch, transformers and diffusers again
IN_PROCESS = {"model", "image", "schedules", "points", "encode", "audio"}


def run_bench(args: list[str], tmp_path) -> tuple[str, list[dict]]:
    out = tmp_path / "rows.jsonl"
    if args[0] in IN_PROCESS:
        from jobs.bench import main

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main([*args, "--json", str(out)]) == 0
        stdout = printed.getvalue()
    else:
        proc = subprocess.run([sys.executable, "-m", "jobs.bench", *args, "--json", str(out)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout = proc.stdout
    return stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_model_bench_compares_against_diffusers_in_one_run(tmp_path):
    stdout, rows = run_bench(["model", "--device", "cpu", "--preset", "tiny", "--sizes", "64,128",
                              "--caption-len", "8", "--warmup", "0", "--repeats", "1", "--profile"], tmp_path)
    assert stdout.startswith("device: CPU")
    assert stdout.count("Self CPU time total") == 1  # --profile: where our forward's time goes, at the first size
    assert [r["size"] for r in rows] == [64, 128]
    for row in rows:
        assert row["rel_err"] < 1e-5  # both models hold the same weights and see the same inputs
        assert row["ratio"] == pytest.approx(row["ours_ms"] / row["peer_ms"])


def test_train_bench_times_the_zero3_step_beside_the_peer(tmp_path):
    stdout, rows = run_bench(["train", "--device", "cpu", "--preset", "tiny", "--sizes", "64:2,128:1",
                              "--caption-len", "8", "--warmup", "0", "--repeats", "1"], tmp_path)
    assert "ZeRO-3 | activation checkpointing every 1 block(s)" in stdout
    assert [(r["who"].split()[0], r["size"], r["batch"]) for r in rows] == [
        ("diffusers", 64, 2), ("diffusers", 128, 1), ("ours", 64, 2), ("ours", 128, 1)]
    from jobs.benchmarks.train import make_inputs
    from jobs.training.metrics import train_flops
    from models import preset

    cfg = preset("tiny")
    for row in rows:
        tokens = (row["size"] // 16) ** 2
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * tokens)
        mask = make_inputs(cfg, row["size"], row["batch"], 8, "cpu")[-1]
        flops = train_flops(cfg, tokens, float(mask.sum(1).float().mean())) * row["batch"]
        assert row["tflops"] == pytest.approx(flops / (row["ms"] / 1000) / 1e12)
        assert row["mfu_measured"] == pytest.approx(row["tflops"] / row["ceiling_tflops"])
    ours = [r for r in rows if r["who"].startswith("ours")]
    assert all(0 < r["loss"] < 10 for r in ours)
    for row in ours:  # where the step's time goes: each phase measured
        assert list(row["phases_ms"]) == ["forward", "backward", "optimizer", "ema"]
        assert all(v > 0 for v in row["phases_ms"].values())
    assert "phases: forward" in stdout


def test_build_bench_builds_whole_and_partitioned_on_each_worker(tmp_path):
    stdout, rows = run_bench(["build", "--preset", "small", "--workers", "2"], tmp_path)
    assert stdout.startswith("device: CPU, 2 processes")
    assert sorted((r["partitioned"], r["rank"]) for r in rows) == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert len({r["params"] for r in rows}) == 1  # every worker accounts for the whole model, held whole or in part


def test_image_bench_generates_through_our_sampler_and_diffusers_pipeline(tmp_path):
    stdout, (row,) = run_bench(["image", "--device", "cpu", "--preset", "tiny", "--size", "64", "--steps", "2",
                                "--warmup", "0", "--repeats", "1"], tmp_path)
    assert "whole image: ours" in stdout
    assert row["nfe"] == 4 and row["size"] == 64 and row["ratio"] == pytest.approx(row["ours_ms"] / row["peer_ms"])


def test_a_failing_optional_contender_is_reported_and_the_other_rows_still_come_out(tmp_path, monkeypatch, capsys):
    """A device session is too short to lose the eager rows to an FP8 path that fails on an untried GPU or torch."""
    from jobs.benchmarks import model as model_bench
    from models import fp8

    def broken(self, x):
        raise RuntimeError("_scaled_mm: scaling mode unsupported here")

    monkeypatch.setattr(fp8.Float8Linear, "forward", broken)
    out = tmp_path / "rows.jsonl"
    assert model_bench.main(["--device", "cpu", "--preset", "tiny", "--sizes", "64,128", "--caption-len", "8",
                             "--fp8", "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "64² ours FP8: failed, left out (RuntimeError: _scaled_mm: scaling mode unsupported here)" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["size"], r.get("fp8", False)) for r in rows] == [(64, False), (128, False)]


def test_schedules_bench_ranks_schedules_against_uniform_in_one_run(tmp_path):
    from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    model = make_tiny_model_folder(tmp_path / "model", make_tiny_text_encoder(tmp_path / "te"),
                                   make_tiny_vae(tmp_path / "vae"))
    stdout, rows = run_bench(["schedules", "--model", model, "--no-ema", "--device", "cpu", "--prompts", "a red cat", "a dog",
                              "--seeds", "1", "--size", "32", "--steps", "2", "4", "--reference-steps", "20",
                              "--centres", "0.5", "--steepness", "0", "3", "--shifts", "2", "4"], tmp_path)
    assert stdout.startswith("device: CPU")
    names = [(r["schedule"], r.get("orientation"), r.get("shift")) for r in rows]
    assert names[:3] == [("uniform", None, None), ("rational", None, 2.0), ("rational", None, 4.0)]
    # 2 orientations × a, b ∈ {0, 3}, the a = b = 0 (uniform) setting measured once: 7 sigmoid rows
    assert sum(r["schedule"] == "sigmoid" for r in rows) == 7
    for row in rows:
        assert len(row["errors"]) == 2 and all(e > 0 for e in row["errors"])
        assert row["vs_uniform"] == pytest.approx([e / u for e, u in zip(row["errors"], rows[0]["errors"])])
    assert "best:" in stdout


def test_audio_bench_reports_the_real_time_factor_and_the_step_against_a_matching_reference(tmp_path):
    stdout, (row,) = run_bench(["audio", "--device", "cpu", "--duration", "1", "--steps", "1", "--batch", "2",
                                "--warmup", "0", "--repeats", "1", "--step-repeats", "1"], tmp_path)
    assert "\ndevice: CPU" in "\n" + stdout and "Next-DiT tiny-audio" in stdout  # (DeepSpeed may log a line first)
    assert "allclose(rtol=0.0001" in stdout and ") True |" in stdout  # checked before anything was timed
    assert row["reference_matched"] and row["reference_rel_err"] < 1e-5 and row["step_rel_err"] < 1e-5
    assert "ratio ours/reference" in stdout and row["step_ratio"] == pytest.approx(row["step_ours_ms"] /
                                                                                   row["step_ref_ms"])
    assert "real-time factor" in stdout and row["rtf"] == pytest.approx(2 * 1.0 / (row["total_ms"] / 1000))
    assert row["nfe"] == 2 and row["latent_frames"] == 32 and row["vocoder"] == "griffin_lim"
    assert list(row["stages_ms"]) == ["text_encode", "solve", "vae_decode", "vocoder"]
    assert all(v > 0 for v in row["stages_ms"].values()) and 0 < row["model_ms"] < row["stages_ms"]["solve"]
    assert sum(row["stages_ms"].values()) == pytest.approx(row["total_ms"])  # one run: the split adds up


def test_points_bench_scores_every_density_and_mode_against_fresh_solids(tmp_path):
    """The density table's command on a tiny random text points model: one row per (density, mode), the pooled
    MMD-CD / COV-CD / 1-NNA of the generated clouds against as many fresh reference clouds, and each mode's MMD against
    the no-scaling anchor of the same run."""
    from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder

    model = make_tiny_model_folder(tmp_path / "model", make_tiny_text_encoder(tmp_path / "te"),
                                   preset_name="tiny-points")
    stdout, rows = run_bench(["points", "--model", model, "--device", "cpu", "--densities", "1,2", "--clouds", "2",
                              "--steps", "2"], tmp_path)
    assert "\ndevice: CPU" in "\n" + stdout and "trained on 256 points" in stdout
    assert [(r["points"], r["mode"]) for r in rows] == [(p, m) for p in (256, 512) for m in ("time_aware", "none", "ntk")]
    for row in rows:
        assert row["clouds"] == 6 and row["mmd_cd"] > 0 and 0 < row["cov_cd"] <= 1 and 0 <= row["1nna_cd"] <= 1
        anchor = next(r for r in rows if r["points"] == row["points"] and r["mode"] == "none")
        assert row["mmd_ratio_vs_none"] == pytest.approx(row["mmd_cd"] / anchor["mmd_cd"])
    # at the training density every mode is the same model: scaling starts above it
    assert len({r["mmd_cd"] for r in rows if r["points"] == 256}) == 1


def test_loader_bench_reads_from_a_local_s3_server_beside_its_anchor():
    """The loader benchmark on a small synthetic output it writes to its own local S3 server: the read rate, then the
    anchor (reads on the training thread) and the prefetched loader under the same stand-in step, and their ratio."""
    proc = subprocess.run([sys.executable, "-m", "jobs.bench", "loader", "--samples", "32", "--per-shard", "8",
                           "--side", "256", "--text-width", "64", "--micro-batch", "4"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "wrote 32 synthetic samples" in out and "(4 shards, 8 steps)" in out
    assert "reads on the training thread (anchor)" in out and "prefetch 2 steps" in out
    assert "prefetch / anchor step rate: " in out and "\ndevice: CPU" in out


def test_adapters_bench_measures_merged_copies_and_one_shared_base_in_fresh_processes(tmp_path):
    """The LoRA memory benchmark on the tiny preset: both ways' parameters (N copies against one base plus N adapters)
    and memory growth, the ratios, and one evaluation unmerged against merged, which agree."""
    stdout, (row,) = run_bench(["adapters", "--device", "cpu", "--preset", "tiny", "--adapters", "3",
                                "--caption-len", "8", "--warmup", "0", "--repeats", "1"], tmp_path)
    assert stdout.startswith("device: CPU") and "3 LoRA variants, rank 16 on wq wk wv wo w1 w2 w3" in stdout
    merged, shared = row["merged"], row["shared"]
    base = merged["parameter_bytes"] / 3  # the merged way holds three copies of the model
    assert base < shared["parameter_bytes"] < 2 * base  # one copy, and three adapters smaller than it
    assert row["ratio_parameters"] == pytest.approx(shared["parameter_bytes"] / merged["parameter_bytes"])
    assert merged["memory_growth"] > 0 and shared["memory_growth"] > 0
    assert row["ratio_step"] == pytest.approx(shared["unmerged_ms"] / shared["merged_ms"])
    assert shared["rel_diff"] < 1e-5  # the unmerged adapter computes what its merged copy does


def test_encode_bench_times_the_prepare_vae_stage_per_dtype_against_float32(tmp_path):
    stdout, rows = run_bench(["encode", "--device", "cpu", "--size", "32", "--batch", "2", "--warmup", "0",
                              "--repeats", "1"], tmp_path)
    assert stdout.startswith("device: CPU")
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and rows[0]["ratio"] == 1.0
    assert all(r["finite"] and r["images_per_s"] > 0 and r["size"] == 32 for r in rows)
