"""Integration tests of ``jobs.train`` / ``jobs.export``: Ray Train V2 + DeepSpeed ZeRO-3 on CPU (gloo), 2 workers, a tiny
Next-DiT, on shards written by the real ``jobs.prepare`` (tiny random VAE and text encoder built locally).

Tolerance of the curve comparison: the 2-worker ZeRO-3 run and the single-process torch AdamW reference compute the same
fp32 math; they differ only by summation order (gradient all-reduce, sharded clipping norm), so per-step losses agree
to ~1e-6 relative over 20 steps. We assert |Δ| ≤ 1e-4 · loss + 1e-5.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.training.config import TrainJobConfig
from jobs.training.data import SampleOrder, ShardCatalog, ShardReader
from jobs.training.metrics import read_history
from models.config_io import from_dict

STEPS = 20
LR = 2e-3  # higher than the official 1e-4 so that the tiny model's loss drops clearly in 20 steps
EMA_DECAY = 0.9  # so that the EMA differs visibly from both the initial and the final weights


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """32 images of two aspect ratios (→ 2 buckets of 16) with captions and class labels, through jobs.prepare."""
    from PIL import Image

    from jobs.prepare import main as prepare
    from tests.pipelines_fixtures import make_image
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    root = tmp_path_factory.mktemp("train-data")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "tree", "house"]
    for i in range(32):
        w, h = [(128, 128), (192, 96)][i % 2]
        Image.fromarray(make_image(rng, w, h)).save(images / f"img_{i:03d}.png")
        (images / f"img_{i:03d}.json").write_text(json.dumps({"caption": f"a red {words[i % 4]}", "label": i % 4}))
    vae = make_tiny_vae(root / "vae")
    text_encoder = make_tiny_text_encoder(root / "text-encoder")
    out = root / "prepared"
    code = prepare(["--input", str(images), "--output", str(out), "--set", f"encode.vae={vae}",
                    "--set", f"encode.text_encoder={text_encoder}", "--set", "bucket.image.max_patches=64",
                    "--set", "bucket.image.batch_tokens=128", "--set", "write.samples_per_shard=5",
                    "--set", "read.modalities=[image]", "--set", "filter.dedup_perceptual=false"])
    assert code == 0
    return {"data": str(out), "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def prepared_images(prepared, tmp_path_factory):
    """The same 32 images through jobs.prepare without a VAE or text encoder: shards carry bucket-sized images (and
    the sidecars' class labels) for online VAE encoding."""
    from jobs.prepare import main as prepare

    images = Path(prepared["data"]).parent / "images"
    out = tmp_path_factory.mktemp("train-images") / "prepared"
    code = prepare(["--input", str(images), "--output", str(out), "--set", "bucket.image.max_patches=64",
                    "--set", "bucket.image.batch_tokens=128", "--set", "write.samples_per_shard=5",
                    "--set", "read.modalities=[image]", "--set", "filter.dedup_perceptual=false"])
    assert code == 0
    return {**prepared, "data": str(out)}


def make_config(prepared, storage, name, workers=2, steps=STEPS, **sections) -> TrainJobConfig:
    data = {"data": {"uri": prepared["data"]},
            "model": {"preset": "tiny"},  # the export takes the encoders jobs.prepare recorded for the shards
            "optim": {"lr": LR}, "ema": {"decay": EMA_DECAY},
            "deepspeed": {"param_persistence_threshold": 0},  # really shard even the tiny model's parameters
            "train": {"steps": steps, "log_every": 1, "ckpt_every": 4, "record_samples": True},
            "scaling": {"workers": workers}, "run": {"storage": str(storage), "name": name, "max_failures": 1},
            "logging": {"wandb": "disabled", "progress": True}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(TrainJobConfig, data)


def fit(cfg: TrainJobConfig):
    from jobs.training.driver import train

    return train(cfg)


def run_catalog(cfg: TrainJobConfig) -> ShardCatalog:
    """The shards a validated run trains on, as its workers read them (its modality, micro-batch overrides: audio
    runs too); before validation (``data.modality`` auto) the image shards at the manifest's micro-batches."""
    if cfg.data.modality == "auto":
        return ShardCatalog.from_manifest(cfg.data.uri)
    return ShardCatalog.from_config(cfg.data)


def phases(cfg: TrainJobConfig, worlds: list) -> list[tuple[int, int]]:
    """(world size, grad_accum) of each step: ``worlds[i]`` is a world size (grad_accum: the config's) or a pair."""
    return [w if isinstance(w, tuple) else (w, cfg.train.grad_accum) for w in worlds]


def reference_run(cfg: TrainJobConfig, worlds: list):
    """Single process, no Ray, no DeepSpeed: plain torch AdamW with the same hyper-parameters, model init and data
    order (the order's global batches; ``worlds[i]`` is the world size at step i + 1, or (world size, grad_accum)).
    Returns losses, weights, EMA."""
    from jobs.training.loop import training_forward
    from jobs.training.parallelize import build_model
    from jobs.training.tasks import make_task
    from models.flow import flow_matching_loss

    catalog = run_catalog(cfg)
    model = build_model(cfg).train()
    forward = training_forward(model, torch.float32, cfg.train.proportional_attn)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    reader, task = ShardReader(catalog, 8), make_task(cfg, catalog, torch.device("cpu"))
    state, losses, keys = None, [], []
    for world, accum in phases(cfg, worlds):
        order = SampleOrder(catalog, accum, world, cfg.data.seed)
        state = order.adopt(state) if state is not None else order.initial_state()
        step = order.next(state)
        opt.zero_grad()
        total, count = 0.0, 0
        for worker in step.samples:
            samples = [reader.sample(s, i) for s, i in worker]
            keys.append((step.step, [s["key"] for s in samples]))
            batch = task.build(samples, step.epoch)
            loss, per_sample = flow_matching_loss(forward, batch.x1, *batch.args, t=batch.t, noise=batch.noise,
                                                  **batch.kwargs)
            # DeepSpeed averages the workers' gradients; a worker's grad_accum micro-batches (equal sizes) are one mean
            (loss / world).backward()
            total, count = total + float(per_sample.detach().sum()), count + len(samples)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        with torch.no_grad():
            for k, v in model.named_parameters():
                ema[k].mul_(cfg.ema.decay).add_(v, alpha=1 - cfg.ema.decay)
        losses.append(total / count)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}, ema, keys


def recorded_steps(run_dir: Path) -> dict[int, dict]:
    """step → {"epoch", "bucket", "keys" (all ranks, rank order)} as kept: a later attempt overrides an earlier one."""
    per_step: dict[int, dict[int, dict]] = {}
    for path in sorted((run_dir / "samples").glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0])):
        rank = int(path.stem.rsplit("rank", 1)[1])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            per_step.setdefault(row["step"], {})[rank] = row
    out = {}
    for step, ranks in per_step.items():
        rows = [ranks[r] for r in sorted(ranks)]
        out[step] = {"epoch": rows[0]["epoch"], "bucket": rows[0]["bucket"],
                     "keys": [k for r in rows for k in r["keys"]]}
    return out


def expected_steps(cfg: TrainJobConfig, worlds: list) -> dict[int, list[str]]:
    catalog = run_catalog(cfg)
    reader, state, out = ShardReader(catalog, 8), None, {}
    for world, accum in phases(cfg, worlds):
        order = SampleOrder(catalog, accum, world, cfg.data.seed)
        state = order.adopt(state) if state is not None else order.initial_state()
        step = order.next(state)
        out[step.step] = [reader.sample(s, i)["key"] for w in step.samples for s, i in w]
    return out


def assert_exactly_once(recorded: dict[int, dict], expected: dict[int, list[str]]):
    assert sorted(recorded) == sorted(expected)
    for step, keys in expected.items():
        assert recorded[step]["keys"] == keys, f"step {step}"
    seen = [(r["epoch"], k) for r in recorded.values() for k in r["keys"]]
    assert len(seen) == len(set(seen)), "a sample was consumed twice in one epoch"


# ---------------------------------------------------------------------------------------------------------------------
# The in-training evaluation of the two_workers run (docs/training.md#in-training-evaluation): at steps 10 and 20,
# two prompts with one seed each, 2 solver steps at the training size; it reads the prompts with the text encoder and
# decodes with the VAE that jobs.prepare recorded for the shards (the run names neither).
EVAL = {"every": 10, "prompts": ["a red cat", "a red dog"], "seeds": [0], "reference_samples": 8,
        "sampler": {"steps": 2, "width": 128, "height": 128}}


@pytest.fixture(scope="module")
def two_workers(prepared, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = make_config(prepared, storage, "two-workers", eval=EVAL)
    result = fit(cfg)
    return cfg, result, storage / "two-workers"


def prepared_text_encoder(cfg: TrainJobConfig) -> str:
    return ShardCatalog.from_manifest(cfg.data.uri).encoders["text_encoder"]["path"]


def test_two_workers_zero3_loss_drops_and_matches_single_process(two_workers):
    cfg, result, run_dir = two_workers
    # precomputed features, no text encoder on the workers: dropped captions get the "" features jobs.prepare stored
    from jobs.training.tasks import make_task
    from models.text_encoder import TextEncoder

    assert cfg.data.text_encoder is None and cfg.flow.caption_dropout > 0
    null_feats, null_mask = make_task(cfg, ShardCatalog.from_manifest(cfg.data.uri), torch.device("cpu")).null
    feats, mask = TextEncoder.from_pretrained(prepared_text_encoder(cfg)).encode([""])
    torch.testing.assert_close(null_feats, feats[:, mask[0]].float(), atol=2e-3, rtol=2e-3)
    assert null_mask.all()
    history = read_history(str(run_dir))
    losses = [row["loss"] for row in history]
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert result.metrics["step"] == STEPS
    # the loss drops clearly
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    # … along the single-process curve over the same data order
    ref_losses, _, _, _ = reference_run(cfg, [2] * STEPS)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
    assert {"grad_norm", "lr", "samples_per_s", "tokens_per_s", "bucket"} <= set(history[-1])
    assert history[-1]["lr"] == LR
    assert_exactly_once(recorded_steps(run_dir), expected_steps(cfg, [2] * STEPS))


def test_export_gives_exactly_the_trained_weights(two_workers, tmp_path):
    from jobs.export import main as export_main
    from jobs.training.checkpointing import consolidate, latest_checkpoint
    from models import NextDiT

    cfg, _, run_dir = two_workers
    latest = latest_checkpoint(str(run_dir))
    assert latest.endswith(f"checkpoint_{STEPS:08d}")
    assert export_main([str(run_dir), str(tmp_path / "model")]) == 0
    raw, ema, _ = consolidate(latest)
    model = NextDiT.from_pretrained(str(tmp_path / "model"))
    ema_model = NextDiT.from_pretrained(str(tmp_path / "model"), ema=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
        assert torch.equal(ema_model.state_dict()[name], ema[name]), name
    # … and these are the weights the single-process reference reaches (same math, fp32 summation order aside)
    _, ref_weights, ref_ema, _ = reference_run(cfg, [2] * STEPS)
    for name in ref_weights:
        torch.testing.assert_close(raw[name], ref_weights[name], rtol=1e-3, atol=2e-5)
        torch.testing.assert_close(ema[name], ref_ema[name], rtol=1e-3, atol=2e-5)
    assert not torch.equal(ema["final_layer.linear.weight"], raw["final_layer.linear.weight"])
    # --no-ema writes raw weights only; the folder converts with jobs.convert
    assert export_main([str(latest), str(tmp_path / "raw"), "--no-ema"]) == 0
    assert not (tmp_path / "raw" / "ema.safetensors").exists()
    from jobs.convert import main as convert_main

    assert convert_main(["--to", "diffusers", str(tmp_path / "model"), str(tmp_path / "diffusers")]) == 0
    # The run named no VAE or text encoder: the folder records those jobs.prepare recorded for the shards (the VAE
    # with its scale and shift), how it was trained, and the buckets it was trained on; it generates with no flags.
    from jobs.generate import main as generate_main
    from models.checkpoint import read_metadata
    from models.vae import ImageVAE

    meta = read_metadata(str(tmp_path / "model"))
    vae = ImageVAE.from_pretrained(prepared_vae(cfg))
    assert meta["vae"] == {"path": prepared_vae(cfg), "scaling_factor": vae.scaling_factor,
                           "shift_factor": vae.shift_factor}
    assert meta["text_encoder"]["path"] == prepared_text_encoder(cfg) and meta["text_encoder"]["kind"] == "decoder"
    assert meta["training"] == {"proportional_attn": False}
    grids = {b.grid(2) for b in ShardCatalog.from_manifest(cfg.data.uri).buckets.values()}
    assert (model.config.trained_area, model.config.trained_sides) == (
        max(g[1] * g[2] for g in grids), tuple(max(g[a] for g in grids) for a in range(3)))
    assert generate_main(["--model", str(tmp_path / "model"), "--prompt", "a red cat", "--size", "128x128",
                          "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_in_training_evaluation_lands_in_the_run_storage(two_workers, tmp_path):
    """Under ZeRO-3 on 2 workers every rank joined the EMA's gather and rank 0 generated the fixed set at steps 10 and
    20: the samples, a grid, metrics.jsonl and the quality curve are in the run's storage, and the fixed seeds on the
    exported EMA weights give the stored samples again."""
    from PIL import Image

    from jobs.export import export
    from jobs.training.evaluation import read_rows
    from models.sampler import GenerationRequest, Sampler

    cfg, _, run_dir = two_workers
    rows = read_rows(str(run_dir / "eval"))
    assert [(r["step"], r["weights"], r["samples"]) for r in rows] == [(10, "ema", 2), (20, "ema", 2)]
    assert all(np.isfinite(r["latent_fd"]) and r["latent_fd"] > 0 for r in rows)
    for step in (10, 20):
        names = {p.name for p in (run_dir / "eval" / f"step_{step:08d}").iterdir()}
        assert names == {"000000_0.png", "000000_0.json", "000001_0.png", "000001_0.json", "grid.png"}
    assert Image.open(run_dir / "eval" / "curve.png").size == (1120, 340)  # the loss beside latent_fd
    export(str(run_dir), str(tmp_path / "model"))
    sampler = Sampler.from_pretrained(str(tmp_path / "model"), ema=True, config=cfg.eval.sampler)
    results = sampler.generate([GenerationRequest(p, seed=0) for p in cfg.eval.prompts])
    for i, result in enumerate(results):
        stored = np.asarray(Image.open(run_dir / "eval" / "step_00000020" / f"{i:06d}_0.png")).astype(int)
        # the same weights and seeds; the worker's thread count may round a matmul otherwise (docs/sampling.md)
        assert np.abs(stored - result.image).max() <= 1


def prepared_vae(cfg: TrainJobConfig) -> str:
    return ShardCatalog.from_manifest(cfg.data.uri).encoders["vae"]["path"]


def test_caption_width_and_encoders_are_checked_on_the_driver(prepared, tmp_path):
    """A preset takes cap_feat_dim from the captions: a 40-wide text encoder (online) gives a 40-wide model; the
    shards' 32-wide features against that encoder, a pretrained model of another width, or a model.vae of another
    scale than the one that made the latents are config errors before any worker starts."""
    from jobs.training.driver import validate
    from models.config_io import ConfigError
    from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    wide = make_tiny_text_encoder(tmp_path / "wide", hidden_size=40)
    cfg = make_config(prepared, tmp_path, "wide", data={"text_features": "online", "text_encoder": wide})
    validate(cfg, write_probe=False)
    assert cfg.model.resolved.cap_feat_dim == 40 and cfg.model.resolved.dim == 64  # the rest is the tiny preset
    shards = make_config(prepared, tmp_path, "shards")
    validate(shards, write_probe=False)
    assert shards.model.resolved.cap_feat_dim == ShardCatalog.from_manifest(shards.data.uri).text_feature_width() == 32
    with pytest.raises(ConfigError, match="text features are 32 wide .*gives 40"):
        validate(make_config(prepared, tmp_path, "mixed", data={"text_encoder": wide}), write_probe=False)
    base = make_tiny_model_folder(tmp_path / "base")
    with pytest.raises(ConfigError, match="takes 32-wide caption features, but the text encoder .* gives 40"):
        validate(make_config(prepared, tmp_path, "tune", model={"init_from": base},
                             data={"text_features": "online", "text_encoder": wide}), write_probe=False)
    # a model.vae that did not make the latents: another scale is an error, a copy elsewhere is fine
    other = make_tiny_vae(tmp_path / "other-vae", scaling_factor=0.5)
    with pytest.raises(ConfigError, match=r"not the VAE that encoded the shards .*scaling_factor 0.5 vs 0.13025"):
        validate(make_config(prepared, tmp_path, "vae", model={"vae": other}), write_probe=False)
    shutil.copytree(prepared["vae"], tmp_path / "same-vae")
    validate(make_config(prepared, tmp_path, "vae", model={"vae": str(tmp_path / "same-vae")}), write_probe=False)


def counting_loop(loop_config):
    """The real worker loop, leaving one marker file per worker start (test-side wrapper)."""
    import os
    import time

    from jobs.training.loop import train_loop_per_worker

    attempts = Path(loop_config["config"]["run"]["storage"]) / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    (attempts / f"{time.time_ns()}-{os.getpid()}").touch()
    train_loop_per_worker(loop_config)


def test_a_deterministic_worker_error_stops_the_run_at_once(prepared, tmp_path):
    """A worker error that every restart would repeat (here a caption width the driver's check was bypassed for)
    ends the run after one attempt, with the worker's message, instead of spending run.max_failures (3)."""
    from jobs.training.driver import build_trainer, validate

    cfg = make_config(prepared, tmp_path, "bad", workers=1, steps=2, run={"max_failures": 3})
    validate(cfg, write_probe=False)
    cfg.model.resolved = cfg.model.resolved.replace(cap_feat_dim=40)  # what validate would have refused
    trainer = build_trainer(cfg)
    trainer.train_loop_per_worker = counting_loop
    with pytest.raises(Exception, match="(?s)a restart would fail the same way.*cap_feats has shape"):
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    assert len(list((tmp_path / "attempts").iterdir())) == 1


class FailOnce:
    """Test-side step callback: rank 1 raises after step ``FAIL_AFTER`` once per run (a marker file in the run folder
    keeps the restarted attempt going)."""

    def __call__(self, event) -> None:
        marker = Path(event.run_dir) / f"injected-failure-{event.step}"
        if event.step == FAIL_AFTER and event.rank == event.world - 1 and not marker.exists():
            marker.write_text(f"rank {event.rank} failed after step {event.step}\n")
            raise RuntimeError(f"injected failure after step {event.step} on rank {event.rank}")


FAIL_AFTER = 6
HELD_UPLOAD = 4  # the checkpoint whose upload loop_held_upload_failing_once holds until the failure


def loop_held_upload_failing_once(loop_config):
    """The training loop with FailOnce, and in the attempt that fails, the upload of checkpoint HELD_UPLOAD never ends (it waits in
    Ray Train's background upload thread until Ray Train kills the worker group after rank 1's failure at step
    FAIL_AFTER): the steps in between train while it is pending. ``ray.train.report`` is wrapped in this worker
    process only."""
    import ray.train

    from jobs.training.checkpointing import checkpoint_dir_name
    from jobs.training.loop import run_worker

    cfg = from_dict(TrainJobConfig, loop_config["config"])
    run_dir = Path(cfg.run.storage) / cfg.run.name
    held, report = checkpoint_dir_name(HELD_UPLOAD), ray.train.report

    def held_upload(checkpoint, dir_name):
        (run_dir / f"upload-held-{ray.train.get_context().get_world_rank()}").write_text("")
        time.sleep(600)  # the test fails on its own long before: the restart never comes
        raise RuntimeError("the held upload was not cut short")

    def reporting(metrics, checkpoint=None, checkpoint_dir_name=None, **kwargs):
        if checkpoint_dir_name == held and not (run_dir / f"injected-failure-{FAIL_AFTER}").exists():
            kwargs["checkpoint_upload_fn"] = held_upload
        report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name, **kwargs)

    class FailOnceUploadHeld(FailOnce):
        """FailOnce, once both ranks' upload threads hold checkpoint HELD_UPLOAD: reports go through the upload thread
        in order and wait for the controller to take them, so on a loaded machine it may reach checkpoint 4 after
        step 6; failing before that would test nothing."""

        def __call__(self, event) -> None:
            if event.step == FAIL_AFTER and event.rank == event.world - 1:
                deadline = time.time() + 120
                while len(list(run_dir.glob("upload-held-*"))) < event.world and time.time() < deadline:
                    time.sleep(0.1)
            super().__call__(event)

    ray.train.report = reporting
    run_worker(cfg, callbacks=[FailOnceUploadHeld()])


def test_worker_failure_mid_upload_resumes_exactly_once(prepared, two_workers, tmp_path):
    """Checkpoints every 2 steps, uploaded in the background (run.checkpoint_upload=async). The upload of checkpoint 4
    is held; steps 5 and 6 train meanwhile and rank 1 dies after step 6, cutting that upload short. Ray Train restarts
    the group from the last complete checkpoint, 2; steps 3–6 are redone with the same samples, the losses equal the
    uninterrupted run's, and the run's storage ends with complete checkpoints only."""
    from jobs.training.checkpointing import is_complete, latest_checkpoint
    from jobs.training.driver import build_trainer, validate

    steps = 8
    cfg = make_config(prepared, tmp_path, "fault", steps=steps, train={"ckpt_every": 2})
    assert cfg.run.checkpoint_upload == "async"
    validate(cfg)
    trainer = build_trainer(cfg)
    trainer.train_loop_per_worker = loop_held_upload_failing_once
    result = trainer.fit()
    assert result.error is None and result.metrics["step"] == steps
    run_dir = tmp_path / "fault"
    assert (run_dir / f"injected-failure-{FAIL_AFTER}").exists()
    assert {p.name for p in run_dir.glob("upload-held-*")} == {"upload-held-0", "upload-held-1"}
    files = sorted((run_dir / "samples").glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0]))
    attempts = [[json.loads(line)["step"] for line in f.read_text().splitlines()] for f in files]
    # two attempts × two ranks: the first trained through step 6 with checkpoint 4 held, the second resumed after 2
    assert attempts == [[1, 2, 3, 4, 5, 6]] * 2 + [[3, 4, 5, 6, 7, 8]] * 2
    assert_exactly_once(recorded_steps(run_dir), expected_steps(cfg, [2] * steps))
    uninterrupted = [r["loss"] for r in read_history(str(two_workers[2]))][:steps]
    np.testing.assert_allclose([r["loss"] for r in read_history(str(run_dir))], uninterrupted, rtol=1e-6)
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000006", "checkpoint_00000008"]  # run.num_to_keep 2
    assert all(is_complete(str(run_dir / name))[0] for name in kept)
    assert latest_checkpoint(str(run_dir)).endswith("checkpoint_00000008")


def test_resume_on_fewer_workers(prepared, two_workers, tmp_path):
    """The two_workers run (2 workers, 20 steps), then the same run name on 1 worker to step 24: the DeepSpeed
    checkpoint is loaded through the universal format, grad_accum 2 keeps the global batch (train.keep_global_batch),
    the loader re-cuts its remaining samples, and the curve follows the reference. The run goes on in a copy of the
    two_workers run's storage (the other tests read it as it is), which saves a first 2-worker fit."""
    shutil.copytree(two_workers[2], tmp_path / "two-workers")
    second = make_config(prepared, tmp_path, "two-workers", workers=1, steps=STEPS + 4)
    result = fit(second)
    assert result.metrics["step"] == STEPS + 4 and second.train.grad_accum == 2
    worlds = [(2, 1)] * STEPS + [(1, 2)] * 4
    run_dir = tmp_path / "two-workers"
    attempts = sorted((run_dir / "metrics").glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0]))
    resumed = [json.loads(line)["step"] for line in attempts[-1].read_text().splitlines()]
    assert resumed == list(range(STEPS + 1, STEPS + 5))  # the 1-worker run went on from step 20, it did not restart
    assert_exactly_once(recorded_steps(run_dir), expected_steps(second, worlds))
    ref_losses, _, _, _ = reference_run(second, worlds)
    np.testing.assert_allclose([r["loss"] for r in read_history(str(run_dir))], ref_losses, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def twenty_photos(prepared, tmp_path_factory):
    """The small-data recipe's input (docs/training.md): 20 images of five sizes, prepared with the default bucket
    settings, whose token-based micro-batches (batch_tokens 16384) are far larger than the data set."""
    from PIL import Image

    from jobs.prepare import main as prepare
    from tests.pipelines_fixtures import make_image

    root = tmp_path_factory.mktemp("few")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        w, h = [(128, 128), (160, 96), (96, 160), (144, 112), (200, 120)][i % 5]
        Image.fromarray(make_image(rng, w, h)).save(images / f"me_{i:02d}.jpg")
        (images / f"me_{i:02d}.txt").write_text(f"a photo of sks {['cat', 'dog'][i % 2]}")
    out = root / "prepared"
    assert prepare(["--input", str(images), "--output", str(out), "--set", f"encode.vae={prepared['vae']}",
                    "--set", "bucket.image.max_patches=64", "--set", "read.modalities=[image]"]) == 0
    return {**prepared, "data": str(out)}


def test_small_data_lora_recipe_on_two_workers(twenty_photos, s3_bucket, tmp_path):
    """docs/training.md's small-data recipe end to end: LoRA on 20 images of mixed sizes, 2 workers, a base model and
    the run's storage on S3, captions encoded online. Without data.micro_batch the driver says what to set; with it the
    run trains and checkpoints to S3, and the adapter exported from there loads on the base model with exactly the
    trained adapter weights and generates."""
    from peft import PeftModel
    from PIL import Image

    from jobs.export import main as export_main
    from jobs.generate import main as generate_main
    from jobs.training.checkpointing import consolidate, latest_checkpoint
    from jobs.training.driver import validate
    from models import NextDiT
    from models.config_io import ConfigError
    from models.storage import filesystem, local_copy
    from tests.tiny_models import make_tiny_model_folder

    base = make_tiny_model_folder(tmp_path / "base", text_encoder=twenty_photos["text_encoder"],
                                  vae=twenty_photos["vae"])
    fs, remote = filesystem(f"s3://{s3_bucket}/base")
    fs.put(f"{base}/", remote, recursive=True)
    sections = dict(model={"init_from": f"s3://{s3_bucket}/base"}, lora={"enabled": True, "rank": 4},
                    data={"text_features": "online", "text_encoder": twenty_photos["text_encoder"]},
                    train={"record_samples": False})
    with pytest.raises(ConfigError, match=r"no bucket holds one global batch .* set a smaller micro-batch: "
                                          r"data.micro_batch=\d"):
        validate(make_config(twenty_photos, tmp_path, "lora", steps=2, **sections), write_probe=False)
    sections["data"]["micro_batch"] = 2
    storage = f"s3://{s3_bucket}/runs"
    cfg = make_config(twenty_photos, storage, "lora", steps=3, **sections)
    assert fit(cfg).metrics["step"] == 3
    latest = latest_checkpoint(f"{storage}/lora")
    assert latest.endswith("/lora/checkpoint_00000003")
    fs, path = filesystem(latest)
    assert {"ema.safetensors", "train_state.json", "ds"} <= {n.rsplit("/", 1)[1] for n in fs.ls(path, detail=False)}
    with local_copy(latest) as folder:  # DeepSpeed's consolidation reads a local folder; jobs.export copies too
        raw, ema, _ = consolidate(folder)
    assert ema is not None and all("lora_" in k for k in ema)  # only the adapters train (and have an EMA)
    assert export_main([latest, str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and (tmp_path / "adapter" / "ema").exists()
    tuned = PeftModel.from_pretrained(NextDiT.from_pretrained(base), str(tmp_path / "adapter"))
    state = tuned.state_dict()
    lora_keys = [k for k in raw if "lora_" in k]
    assert lora_keys and all(torch.equal(state[k], raw[k]) for k in lora_keys)
    assert any(not torch.equal(raw[k], torch.zeros_like(raw[k])) for k in lora_keys if "lora_B" in k)
    assert generate_main(["--model", base, "--adapter", str(tmp_path / "adapter"), "--prompt", "a photo of sks cat",
                          "--size", "160x96", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    (png,) = (tmp_path / "samples").glob("*.png")
    assert np.asarray(Image.open(png)).shape == (96, 160, 3)


def test_class_conditional_online_vae_with_activation_checkpointing(prepared_images, tmp_path):
    """The class-conditional task end to end on 2 ZeRO-3 workers: labels from the sidecars, latents encoded online by
    the frozen VAE from the shards' images, activation checkpointing on. The curve equals the single-process reference
    (which runs without checkpointing: recomputation under ZeRO-3 must not change a gradient), and the export samples
    by class through the Sampler."""
    from jobs.export import main as export_main
    from models.sampler import GenerationRequest, Sampler

    steps = 6
    cfg = make_config(prepared_images, tmp_path, "class", steps=steps,
                      model={"preset": "tiny-class", "text_encoder": None,
                             "class_names": [f"shape {i}" for i in range(10)]},
                      data={"vae": prepared_images["vae"]},
                      train={"task": "class", "activation_checkpointing": True, "ckpt_every": steps})
    assert {s.member for s in ShardCatalog.from_manifest(cfg.data.uri).shards} == {"jpg"}  # images, not latents
    assert fit(cfg).metrics["step"] == steps
    run_dir = tmp_path / "class"
    losses = [r["loss"] for r in read_history(str(run_dir))]
    ref_losses, _, _, _ = reference_run(cfg, [2] * steps)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
    assert_exactly_once(recorded_steps(run_dir), expected_steps(cfg, [2] * steps))

    assert export_main([str(run_dir), str(tmp_path / "model")]) == 0
    sampler = Sampler.from_pretrained(str(tmp_path / "model"), ema=True)
    out = sampler.generate([GenerationRequest("shape 3", width=128, height=128, seed=0, steps=2)])
    assert out[0].image.shape == (128, 128, 3) and out[0].metadata["class_label"] == 3  # named via model.class_names
