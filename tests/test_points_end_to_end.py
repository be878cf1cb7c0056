"""Point clouds end to end (paper §5.3), with tiny random models: jobs.prepare samples captioned solids into 256-point
shards, jobs.train trains tiny-points on 2 workers (the points task picked from the model; the label task:
tests/test_train.py, and a label model's prompts: tests/test_points_model.py), jobs.export writes a model
folder trained at 256 points, and jobs.generate writes clouds of 256 and of 2048 points (any density), the same bytes
for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ray_cluster):
    from jobs.demo_data import SOLIDS, solid_points
    from jobs.export import main as export
    from jobs.prepare import main as prepare
    from jobs.train import main as train
    from models.tiny import make_tiny_text_encoder

    root = tmp_path_factory.mktemp("points-e2e")
    raw = root / "solids"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        solid = SOLIDS[i % len(SOLIDS)]
        np.save(raw / f"solid_{i}.npy", solid_points(solid, 1024, rng).astype(np.float32))
        (raw / f"solid_{i}.json").write_text(json.dumps({"caption": f"a {solid}"}))
    te = make_tiny_text_encoder(root / "te")
    data = root / "prepared"
    assert prepare(["--input", str(raw), "--output", str(data), "--set", "read.modalities=[points]",
                    "--set", "bucket.point_counts=[256]", "--set", f"encode.text_encoder={te}",
                    "--set", "write.samples_per_shard=4"]) == 0
    runs = root / "runs"
    assert train(["--data", str(data), "--storage", str(runs), "--workers", "2", "--preset", "tiny-points",
                  "--steps", "4", "--set", "data.micro_batch=2", "--set", "train.ckpt_every=4",
                  "--set", "logging.wandb=disabled", "--set", "logging.progress=false"]) == 0
    assert export([str(runs / "nextdit"), str(root / "text")]) == 0
    models = {"text": str(root / "text")}
    return {"model": models["text"], "root": root, "te": te}


def test_trained_at_256_points_generates_any_density(exported):
    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint, read_modality

    cfg, _, meta = read_checkpoint(exported["model"], tensors=False)
    assert read_modality(exported["model"]) == "points" and cfg.trained_sides == (1, 1, 256)
    assert meta["text_encoder"]["path"] == exported["te"] and "vae" not in meta
    out = exported["root"] / "out"
    for points in (256, 2048):
        argv = ["--model", exported["model"], "--prompt", "a cube", "--points", str(points), "--seed", "4",
                "--steps", "2"]
        assert generate(argv + ["--out", str(out / f"{points}")]) == 0
        cloud = np.load(out / f"{points}" / "000000_4.npy")
        assert cloud.shape == (points, 3) and np.isfinite(cloud).all()
        assert (out / f"{points}" / "000000_4.ply").exists() and (out / f"{points}" / "000000_4.png").exists()
        assert generate(argv + ["--out", str(out / f"{points}-again")]) == 0
        assert ((out / f"{points}-again" / "000000_4.ply").read_bytes()
                == (out / f"{points}" / "000000_4.ply").read_bytes())


def test_point_shards_need_a_points_model(exported, tmp_path):
    from jobs.train import main as train
    from models.config_io import ConfigError

    argv = ["--data", str(exported["root"] / "prepared"), "--storage", str(tmp_path), "--workers", "1",
            "--preset", "tiny", "--steps", "1", "--dry-run"]
    with pytest.raises(ConfigError, match="lists no image shards"):
        train(argv)
    with pytest.raises(ConfigError, match="data.modality is points, but the model .* is an image model"):
        train(argv + ["--set", "data.modality=points"])
