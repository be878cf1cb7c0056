"""Point clouds end to end (paper §5.3), with tiny random models: jobs.prepare samples captioned solids, in one folder
per solid, into 256-point shards (the default bucket) with text features and labels from the folder names; jobs.train
trains tiny-points on 1 worker on the labels (the label task; the text task on 2 ZeRO-3 workers is the demo's points
model, tests/test_demo.py, and the shards' text features pick it here in a dry run); jobs.export writes a model folder
trained at 256 points, and jobs.generate writes clouds of 256 and of 2048 points (any density), the same bytes for the
same seed, from a class name."""

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
    rng = np.random.default_rng(0)
    for i in range(8):
        solid = SOLIDS[i % len(SOLIDS)]
        (raw / solid).mkdir(parents=True, exist_ok=True)
        np.save(raw / solid / f"solid_{i}.npy", solid_points(solid, 1024, rng).astype(np.float32))
        (raw / solid / f"solid_{i}.json").write_text(json.dumps({"caption": f"a {solid}"}))
    te = make_tiny_text_encoder(root / "te")
    data = root / "prepared"
    assert prepare(["--input", str(raw), "--output", str(data), "--set", "read.modalities=[points]",
                    "--set", "read.label_from=folder", "--set", f"encode.text_encoder={te}",
                    "--set", "write.samples_per_shard=4"]) == 0
    assert json.loads((data / "labels.json").read_text())["class_names"] == ["cube", "cylinder", "sphere"]
    runs = root / "runs"
    common = ["--data", str(data), "--storage", str(runs), "--preset", "tiny-points", "--set", "data.micro_batch=2",
              "--set", "logging.wandb=disabled", "--set", "logging.progress=false"]
    # 1 worker: a second worker process costs seconds of start-up on 2 cores and adds nothing checked here. One fit,
    # on the labels: the text task's fit, export and any-density generation from a prompt are the demo's points model
    # (tests/test_demo.py), on 2 ZeRO-3 workers
    assert train([*common, "--workers", "1", "--steps", "2", "--set", "train.ckpt_every=2",
                  "--set", "train.task=class-points", "--set", "run.name=labels"]) == 0
    assert export([str(runs / "labels"), str(root / "labels")]) == 0
    return {"labels": str(root / "labels"), "root": root}


def test_trained_at_256_points_generates_any_density(exported):
    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint, read_modality

    cfg, _, meta = read_checkpoint(exported["labels"], tensors=False)
    assert read_modality(exported["labels"]) == "points" and cfg.trained_sides == (1, 1, 256) and "vae" not in meta
    out = exported["root"] / "out"
    for points in (256, 2048):
        argv = ["--model", exported["labels"], "--prompt", "cube", "--points", str(points), "--seed", "4",
                "--steps", "2"]
        assert generate(argv + ["--out", str(out / f"{points}")]) == 0
        cloud = np.load(out / f"{points}" / "000000_4.npy")
        assert cloud.shape == (points, 3) and np.isfinite(cloud).all()
        assert (out / f"{points}" / "000000_4.ply").exists() and (out / f"{points}" / "000000_4.png").exists()
        assert generate(argv + ["--out", str(out / f"{points}-again")]) == 0
        assert ((out / f"{points}-again" / "000000_4.ply").read_bytes()
                == (out / f"{points}" / "000000_4.ply").read_bytes())


def test_a_label_model_trained_on_folder_labels_generates_by_class_name(exported):
    from jobs.generate import main as generate
    from models.checkpoint import read_checkpoint

    cfg, _, meta = read_checkpoint(exported["labels"], tensors=False)
    assert (cfg.conditioning, cfg.num_classes) == ("class", 3)  # the preset's count, checked against labels.json
    assert meta["class_names"] == ["cube", "cylinder", "sphere"] and "text_encoder" not in meta
    out = exported["root"] / "out-labels"
    argv = ["--model", exported["labels"], "--prompt", "cube", "--points", "512", "--seed", "1", "--steps", "2"]
    assert generate(argv + ["--out", str(out / "a")]) == 0 and generate(argv + ["--out", str(out / "b")]) == 0
    record = json.loads((out / "a" / "000000_1.json").read_text())
    assert record["class_label"] == 0 and np.load(out / "a" / "000000_1.npy").shape == (512, 3)
    assert (out / "a" / "000000_1.ply").read_bytes() == (out / "b" / "000000_1.ply").read_bytes()


def test_labelled_shards_with_text_features_train_the_text_task(exported, tmp_path, capsys):
    from jobs.train import main as train

    argv = ["--data", str(exported["root"] / "prepared"), "--storage", str(tmp_path), "--workers", "1",
            "--preset", "tiny-points", "--steps", "1", "--set", "data.micro_batch=2", "--dry-run"]
    assert train(argv) == 0 and "task t2p" in capsys.readouterr().out  # text wins (labels alone: tests/test_train.py)
    assert train(argv + ["--set", "train.task=class-points"]) == 0
    assert "3 classes (cube, cylinder, sphere)" in capsys.readouterr().out


def test_point_shards_need_a_points_model(exported, tmp_path):
    from jobs.train import main as train
    from models.config_io import ConfigError

    argv = ["--data", str(exported["root"] / "prepared"), "--storage", str(tmp_path), "--workers", "1",
            "--preset", "tiny", "--steps", "1", "--dry-run"]
    with pytest.raises(ConfigError, match="lists no image shards"):
        train(argv)
    with pytest.raises(ConfigError, match="data.modality is points, but the model .* is an image model"):
        train(argv + ["--set", "data.modality=points"])
