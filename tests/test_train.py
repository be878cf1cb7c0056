"""Unit tests of the trainer's pieces (no Ray): the bucketed loader catalog, FLOP/MFU arithmetic, config validation,
--dry-run, and compiled blocks on a DeepSpeed engine in a world of one. Integration tests with Ray Train + DeepSpeed on
several workers live in test_train_ray.py."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.training.config import TrainJobConfig
from jobs.training.data import BucketInfo, BucketLoader, LoaderState, SampleOrder, ShardCatalog, ShardInfo, cut
from jobs.training.metrics import forward_flops, mfu, train_flops
from models import NextDiT, preset
from models.config_io import ConfigError, from_dict
from pipelines import constants as C


def toy_catalog(counts: dict[str, list[int]], micro_batch: int = 2) -> ShardCatalog:
    shards, buckets = [], {}
    for name, sizes in counts.items():
        ids = []
        for n in sizes:
            ids.append(len(shards))
            shards.append(ShardInfo(len(shards), f"shards/image/{name}/{len(ids):06d}.tar", name, n, (4, 8, 8),
                                    C.LATENT_MEMBER))
        buckets[name] = BucketInfo(name, (4, 8, 8), micro_batch, C.LATENT_MEMBER, tuple(ids))
    return ShardCatalog("/nowhere", shards, buckets)


def consumed(plan_steps) -> list[tuple[int, tuple[int, int]]]:
    return [(s.epoch, x) for s in plan_steps for worker in s.samples for x in worker]


def test_cut_is_contiguous_and_even():
    pieces = cut([[0, 0, 5], [1, 0, 3], [2, 2, 4]], 3)
    assert [sum(e - s for _, s, e in p) for p in pieces] == [4, 3, 3]
    flat = [(sh, i) for p in pieces for sh, s, e in p for i in range(s, e)]
    assert flat == [(0, i) for i in range(5)] + [(1, i) for i in range(3)] + [(2, 2), (2, 3)]


def test_plan_is_deterministic_and_exactly_once_per_epoch():
    catalog = toy_catalog({"a": [5, 5, 3], "b": [4, 4]})
    order = SampleOrder(catalog, grad_accum=1, world=2, seed=7)
    state = order.initial_state()
    steps = [order.next(state) for _ in range(5)]
    # every step: one bucket, every worker the same number of samples
    assert all(len(w) == 2 for s in steps for w in s.samples)
    first_epoch = [x for e, x in consumed(steps) if e == 0]
    assert len(first_epoch) == len(set(first_epoch))
    # 13 samples in a, 8 in b, global batch 4: 3 + 2 steps, the < 4 remainder of a (1 sample) is dropped
    assert len(first_epoch) == 20 and steps[-1].epoch == 0
    again = SampleOrder(catalog, 1, 2, seed=7)
    state2 = again.initial_state()
    assert [again.next(state2) for _ in range(5)] == steps
    other = SampleOrder(catalog, 1, 2, seed=8)
    state3 = other.initial_state()
    assert [other.next(state3) for _ in range(5)] != steps


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_keeps_exactly_once(new_world):
    catalog = toy_catalog({"a": [6, 6, 6, 6], "b": [6, 6, 6]}, micro_batch=1)
    order = SampleOrder(catalog, grad_accum=2, world=2, seed=0)
    state = order.initial_state()
    before = [order.next(state) for _ in range(3)]
    saved = json.loads(state.to_json())  # what the checkpoint holds

    from jobs.training.data import LoaderState

    resumed = SampleOrder(catalog, grad_accum=2, world=new_world, seed=0)
    state2 = resumed.adopt(LoaderState(**saved))
    after = []
    while True:
        step = resumed.next(state2)
        if step.epoch > 0:
            break
        after.append(step)
    samples = [x for e, x in consumed(before + after)]
    assert len(samples) == len(set(samples))  # nothing twice
    total = sum(s.samples for s in catalog.shards)
    assert total - len(samples) < 2 * new_world * 2  # at most one global batch per bucket dropped at the epoch end
    assert state2.step == len(before) + len(after) + 1


def test_bucket_without_samples_and_missing_manifest(tmp_path):
    with pytest.raises(ConfigError, match="no manifest.parquet"):
        ShardCatalog.from_manifest(str(tmp_path))
    rows = [{"path": "shards/image/64x64/000000.tar", "modality": "image", "bucket": "64x64", "member": "latent.npy",
             "shape": [4, 8, 8], "dtype": "float16", "micro_batch": 2, "samples": 0, "bytes": 0, "sha256": "",
             "run_id": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / C.MANIFEST_FILE)
    with pytest.raises(ConfigError, match="bucket '64x64' has no samples"):
        ShardCatalog.from_manifest(str(tmp_path))


def test_flops_arithmetic_matches_flop_counter():
    """Our closed form against torch's FLOP counter on the tiny model (matmuls + SDPA, forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset("tiny", proportional_attn=False)
    model = NextDiT(cfg).eval()
    n_tokens, n_cap = 64, 8  # 16×16 latent → 8×8 tokens
    x, t = torch.randn(1, 4, 16, 16), torch.rand(1)
    feats, mask = torch.randn(1, n_cap, cfg.cap_feat_dim), torch.ones(1, n_cap, dtype=torch.bool)
    with FlopCounterMode(display=False, depth=2) as counter, torch.no_grad():
        model(x, t, feats, mask)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    ours = forward_flops(cfg, n_tokens, n_cap)
    # The counter does not see the CPU attention kernel, and it counts the timestep / caption-pooling MLPs that run
    # once per sample (outside our per-token count): compare the rest exactly.
    attention = cfg.n_layers * (4 * n_tokens * n_tokens * cfg.dim + 4 * n_tokens * n_cap * cfg.dim)
    per_sample = counts["NextDiT.t_embedder"] + counts["NextDiT.cap_embedder"]
    assert ours - attention == counts["Global"] - per_sample
    assert train_flops(cfg, n_tokens, n_cap) == 3 * ours


def test_mfu_arithmetic():
    # 2B-GQA at 1024² (4096 tokens, 128 caption tokens): ≈ 6·N·params + attention
    cfg = preset("2B-GQA")
    flops = train_flops(cfg, 4096, 128)
    params = sum(p.numel() for p in NextDiT.__new__(NextDiT).__class__(cfg.replace(n_layers=1)).parameters())
    assert 6 * 4096 * params < flops  # attention and all 24 layers on top of one layer's 6·N·P
    # 8 devices at 989 TFLOP/s, 100 samples in 10 s
    assert mfu(flops * 100, 10.0, 8, 989e12) == pytest.approx(flops * 10 / (8 * 989e12))
    assert mfu(1.0, 1.0, 1, None) is None


def test_config_defaults_are_official():
    cfg = TrainJobConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.warmup_steps) == (1e-4, 0.0, 2.0, 0)
    assert cfg.ema.decay == 0.9999 and cfg.flow.caption_dropout == 0.1 and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(TrainJobConfig, {"optim": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(TrainJobConfig, {"optim": {"lr": "fast"}})


def _tiny_shards(root: Path, with_text: bool = True, modality: str = "image", bucket: str = "128x128",
                 member: str = C.LATENT_MEMBER, shape: tuple[int, ...] = (4, 16, 16), samples: int = 4,
                 shards: int = 1) -> Path:
    """A minimal jobs.prepare-shaped output (``shards`` shards of ``samples`` samples; sample k's tensor is filled with
    k) for the fast validation tests."""
    shard_dir = root / "shards" / modality / bucket
    shard_dir.mkdir(parents=True)
    rows = []
    for shard in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(shard * samples, (shard + 1) * samples):
                members = {member: np.full(shape, i, np.float16), C.CAPTION_MEMBER: b"a cat",
                           C.META_MEMBER: json.dumps({"member": member}).encode()}
                if with_text:
                    members[C.TEXT_FEATURES_MEMBER] = np.zeros((3, 32), np.float16)
                for name, value in members.items():
                    if isinstance(value, np.ndarray):
                        b = io.BytesIO()
                        np.save(b, value)
                        value = b.getvalue()
                    info = tarfile.TarInfo(f"{i:016x}.{name}")
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))
        (shard_dir / f"{shard:06d}.tar").write_bytes(buf.getvalue())
        rows.append({"path": f"shards/{modality}/{bucket}/{shard:06d}.tar", "modality": modality, "bucket": bucket,
                     "member": member, "shape": list(shape), "dtype": "float16", "micro_batch": 2,
                     "samples": samples, "bytes": len(buf.getvalue()), "sha256": "", "run_id": "x"})
    pq.write_table(pa.Table.from_pylist(rows), root / C.MANIFEST_FILE)
    return root


def run_train(argv):
    from jobs.train import main

    return main(argv)


def _steps(loader: BucketLoader, n: int) -> list[tuple[int, str, list[int], str]]:
    """n steps of a loader: (step, bucket, the samples' fill values, the state after the step)."""
    out = []
    for _ in range(n):
        plan, micro_batches = loader.next()
        out.append((plan.step, plan.bucket, [int(s["tensor"].flat[0]) for mb in micro_batches for s in mb],
                    loader.state.to_json()))
    return out


def test_prefetching_gives_the_same_steps_and_states_and_resumes_exactly_once(tmp_path):
    """Reading ahead in a thread changes nothing a step gets: the same samples, and a state (what a checkpoint saves)
    that is that of the steps taken, never of the prefetched ones — a loader built from it mid-run continues as the
    uninterrupted one, across the epoch's end; and the thread reads nothing past ``until``."""
    catalog = ShardCatalog.from_manifest(str(_tiny_shards(tmp_path, samples=5, shards=3)), micro_batch=2)
    steps = 10  # an epoch is 7 steps of 2 (15 samples): the run crosses into the second
    plain = _steps(BucketLoader(catalog, 0, 1, 1, seed=3, until=steps), steps)
    ahead = BucketLoader(catalog, 0, 1, 1, seed=3, prefetch=3, until=steps)
    first = _steps(ahead, 4)
    resumed = BucketLoader(catalog, 0, 1, 1, seed=3, state=LoaderState.from_json(ahead.state.to_json()), prefetch=2,
                           until=steps)
    assert first + _steps(resumed, steps - 4) == plain
    assert _steps(ahead, steps - 4) == plain[4:]
    for loader in (ahead, resumed):
        loader._producer.join(timeout=10)
        assert not loader._producer.is_alive()  # stopped by itself after step `until`
        with pytest.raises(RuntimeError, match="stop after step 10"):
            loader.next()
    stopped = BucketLoader(catalog, 0, 1, 1, seed=3, prefetch=2)  # no `until`: close() stops it
    stopped.next()
    stopped.close()
    assert not stopped._producer.is_alive()


def test_a_read_error_while_prefetching_is_the_steps_error(tmp_path):
    """A shard that does not hold what the manifest says fails the step that needs the missing sample, on the training
    thread; the steps before it train."""
    root = _tiny_shards(tmp_path, samples=4)
    table = pq.read_table(root / C.MANIFEST_FILE).to_pylist()
    table[0]["samples"] = 6
    pq.write_table(pa.Table.from_pylist(table), root / C.MANIFEST_FILE)
    loader = BucketLoader(ShardCatalog.from_manifest(str(root), micro_batch=2), 0, 1, 1, seed=0, prefetch=2)
    assert [loader.next()[0].step for _ in range(2)] == [1, 2]
    with pytest.raises(RuntimeError, match="the manifest says 6 samples, the shard holds 4"):
        loader.next()
    loader.close()


def _checkpoint(run: Path, step: int, world: int = 2) -> Path:
    """A checkpoint folder as the ranks' uploads leave it: each rank's files and its ranks/{r}.json list of them."""
    from jobs.training.checkpointing import RANKS_DIR, STATE_FILE, checkpoint_dir_name

    folder = run / checkpoint_dir_name(step)
    for rank in range(world):
        files = {f"ds/zero_pp_rank_{rank}_model_states.pt": b"p" * (10 + rank)}
        if rank == 0:
            files[STATE_FILE] = json.dumps({"step": step, "world": world}).encode()
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        (folder / RANKS_DIR).mkdir(exist_ok=True)
        (folder / RANKS_DIR / f"{rank}.json").write_text(json.dumps({n: len(d) for n, d in files.items()}))
    return folder


def test_the_newest_complete_checkpoint_is_the_latest(tmp_path):
    """An upload cut short leaves a checkpoint folder without some rank's files, or with a file shorter than its rank
    listed: jobs.export and the resume's checks pass over it to the newest complete one; named, it is an error."""
    from jobs.training.checkpointing import is_complete, latest_checkpoint, read_latest_state

    run = tmp_path / "run"
    _checkpoint(run, 2)
    cut_short = _checkpoint(run, 4)
    (cut_short / "ranks" / "1.json").unlink()  # rank 1's upload never arrived
    short = _checkpoint(run, 6)
    (short / "ds" / "zero_pp_rank_1_model_states.pt").write_bytes(b"p")  # a partly copied file
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, beside the checkpoints: not one
    assert is_complete(str(run / "checkpoint_00000002")) == (True, "")
    assert is_complete(str(cut_short)) == (False, "rank 1's files are not there (ranks/1.json)")
    assert is_complete(str(short)) == (False, "rank 1's ds/zero_pp_rank_1_model_states.pt is short")
    assert latest_checkpoint(str(run)) == str(run / "checkpoint_00000002")
    assert read_latest_state(str(run))["step"] == 2
    with pytest.raises(FileNotFoundError, match="is incomplete"):
        latest_checkpoint(str(short))
    assert read_latest_state(str(tmp_path / "no-run-yet")) is None


def test_bad_configs_fail_before_workers(tmp_path, capsys):
    data = _tiny_shards(tmp_path / "data")
    base = ["--data", str(data), "--storage", str(tmp_path / "runs"), "--preset", "tiny", "--steps", "2"]
    with pytest.raises(ConfigError, match="unknown config key"):
        run_train(base + ["--set", "train.no_such_field=1"])
    with pytest.raises(ConfigError, match="no manifest.parquet"):
        run_train(["--data", str(tmp_path / "empty"), *base[2:]])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        run_train([*base[:2], "--storage", str(blocked / "runs"), *base[4:]])
    with pytest.raises(ConfigError, match="cap_feat_dim"):
        run_train(base + ["--set", "model.overrides={cap_feat_dim: 16}"])
    no_text = _tiny_shards(tmp_path / "data2", with_text=False)
    with pytest.raises(ConfigError, match="--text-encoder"):
        run_train(["--data", str(no_text), *base[2:]])
    with pytest.raises(ConfigError, match="no bucket holds one global batch .* set a smaller micro-batch: "
                                          "data.micro_batch=1 .* or data.bucket_micro_batch.128x128=1"):
        run_train(base + ["--workers", "3"])
    with pytest.raises(ConfigError, match="has 4 samples, fewer than 5 worker.* use fewer workers"):
        run_train(base + ["--workers", "5"])
    with pytest.raises(ConfigError, match="class-conditional task"):
        run_train(base + ["--set", "model.class_names=[a, b]"])
    with pytest.raises(ConfigError, match="2 names; the model has 10 classes"):
        run_train([*base[:4], "--preset", "tiny-class", "--steps", "2", "--set", "train.task=class",
                   "--set", "model.class_names=[a, b]"])
    with pytest.raises(ConfigError, match="model.init_from: no checkpoint at"):
        run_train(base + ["--set", f"model.init_from={tmp_path / 'no_model'}"])
    assert run_train(base + ["--workers", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "bucket 128x128" in out and "global batch 4" in out and '"stage": 3' in out
    assert "built partitioned across the workers" in out
    assert "caption width 32, trained on: area 64 tokens, sides [1, 8, 8]" in out  # 16² latents → 8×8 tokens
    assert run_train(base + ["--workers", "3", "--set", "data.micro_batch=1", "--dry-run"]) == 0
    assert "micro-batch 1, global batch 3" in capsys.readouterr().out


def test_micro_batch_one_number_with_per_bucket_overrides(tmp_path):
    data = _tiny_shards(tmp_path / "data")
    assert ShardCatalog.from_manifest(str(data)).buckets["128x128"].micro_batch == 2  # the manifest's
    assert ShardCatalog.from_manifest(str(data), micro_batch=3).buckets["128x128"].micro_batch == 3
    catalog = ShardCatalog.from_manifest(str(data), micro_batch=3, bucket_micro_batch={"128x128": 1})
    assert catalog.buckets["128x128"].micro_batch == 1
    with pytest.raises(ConfigError, match=r"names bucket\(s\) \['64x64'\] .*it has \['128x128'\]"):
        ShardCatalog.from_manifest(str(data), bucket_micro_batch={"64x64": 1})
    with pytest.raises(ConfigError, match="data.micro_batch must be >= 1"):
        from_dict(TrainJobConfig, {"data": {"uri": "x", "micro_batch": 0}, "run": {"storage": "y"}}).validate()


def test_shards_of_different_encoders_are_refused(tmp_path):
    """A manifest whose latent shards were made by two VAEs (e.g. an output extended with another encode.vae) is a
    config error naming both shards; the records of one VAE come through to the catalog."""
    data = _tiny_shards(tmp_path / "data")
    table = pq.read_table(data / C.MANIFEST_FILE).to_pylist()
    vae = {"path": "s3://models/vae-a", "scaling_factor": 0.13025, "shift_factor": 0.0, "latent_channels": 4}
    one = [{**r, C.MANIFEST_VAE: json.dumps(vae, sort_keys=True), C.MANIFEST_TEXT_ENCODER: None} for r in table]
    pq.write_table(pa.Table.from_pylist(one), data / C.MANIFEST_FILE)
    assert ShardCatalog.from_manifest(str(data)).encoders == {"vae": vae, "text_encoder": None}
    other = {**one[0], "path": "shards/image/128x128/000001.tar",
             C.MANIFEST_VAE: json.dumps({**vae, "path": "s3://models/vae-b"}, sort_keys=True)}
    pq.write_table(pa.Table.from_pylist(one + [other]), data / C.MANIFEST_FILE)
    with pytest.raises(ConfigError, match="(?s)000000.tar.*000001.tar.*train on shards of one encoder"):
        ShardCatalog.from_manifest(str(data))


def test_class_conditional_task_builds_a_loss():
    """The class task: labels from the json metadata, dropped to the null class; the same flow loss as text-to-image."""
    from jobs.training.parallelize import build_model
    from jobs.training.tasks import TASKS, ClassConditional
    from models.flow import flow_matching_loss

    cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny-class"}, "train": {"task": "class"},
                                  "flow": {"caption_dropout": 0.5}})
    assert TASKS["class"] is ClassConditional  # what train.task=class dispatches to
    task = ClassConditional(cfg, None, torch.device("cpu"))  # labels need no shard catalog
    samples = [{"key": f"{i:016x}", "tensor": np.random.default_rng(i).normal(size=(4, 16, 16)).astype(np.float16),
                "meta": {"member": C.LATENT_MEMBER, "label": i % 3}} for i in range(8)]
    batch = task.build(samples, epoch=0)
    labels = batch.kwargs["labels"].tolist()
    assert set(labels) <= {0, 1, 2, 10} and 10 in labels and any(v != 10 for v in labels)  # null class = 10
    assert labels == task.build(samples, epoch=0).kwargs["labels"].tolist()  # seeded per sample
    loss, per_sample = flow_matching_loss(build_model(cfg), batch.x1, t=batch.t, noise=batch.noise, **batch.kwargs)
    assert per_sample.shape == (8,) and torch.isfinite(loss)


def test_point_tasks_give_the_points_as_tokens_with_labels_or_captions():
    """The points tasks (paper §5.3): a sample's (N, 3) points become the model input (3, 1, N); the label task reads
    the json label (dropped to the null class), and both train with the same flow loss."""
    from jobs.training.parallelize import build_model
    from jobs.training.tasks import TASKS, LabelToPoints, TextToPoints, task_for
    from models.flow import flow_matching_loss

    assert task_for("points", "class") == "class-points" and task_for("points", "text") == "t2p"
    assert TASKS["class-points"] is LabelToPoints and TASKS["t2p"] is TextToPoints
    cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny-points", "overrides": {"conditioning": "class"}},
                                     "train": {"task": "class-points"}, "flow": {"caption_dropout": 0.5}})
    task = LabelToPoints(cfg, None, torch.device("cpu"))
    clouds = [np.random.default_rng(i).normal(size=(256, 3)).astype(np.float32) for i in range(8)]
    samples = [{"key": f"{i:016x}", "tensor": c, "meta": {"member": C.POINTS_MEMBER, "label": i % 3}}
               for i, c in enumerate(clouds)]
    batch = task.build(samples, epoch=0)
    assert batch.x1.shape == (8, 3, 1, 256) and torch.equal(batch.x1[2, :, 0].T, torch.from_numpy(clouds[2]))
    labels = batch.kwargs["labels"].tolist()
    assert set(labels) <= {0, 1, 2, 3} and 3 in labels and any(v != 3 for v in labels)  # null class = 3
    loss, per_sample = flow_matching_loss(build_model(cfg), batch.x1, t=batch.t, noise=batch.noise, **batch.kwargs)
    assert per_sample.shape == (8,) and torch.isfinite(loss)


def test_online_audio_captions_give_a_stack_the_caption_and_the_structured_caption(tmp_path):
    """t2a with text_features=online through the paper's dual encoder (§5.2): each sample's caption goes to CLAP and
    its structured caption (the shards' meta) to T5, the features the stack gives for that pair; a sample without one
    gives T5 its caption, as jobs.prepare does."""
    from jobs.training.data import ShardCatalog
    from jobs.training.tasks import TextToAudio
    from models.text_encoder import TextEncoder
    from models.tiny import make_tiny_text_encoder_stack

    stack_path = make_tiny_text_encoder_stack(tmp_path / "stack")
    cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny-audio"}, "flow": {"caption_dropout": 0.0},
                                     "data": {"text_encoder": stack_path, "text_features": "online"}})
    task = TextToAudio(cfg, ShardCatalog("mem://data", [], {}), torch.device("cpu"))
    caption, structured = "a tone at 440 hertz", '{"pitch": 440, "timbre": "sine"}'
    samples = [{"key": "0", "caption": caption, "meta": {C.STRUCTURED_CAPTION: structured}},
               {"key": "1", "caption": caption, "meta": {}}]
    (feats, mask), _, _ = task.conditioning(samples, [torch.Generator().manual_seed(i) for i in range(2)])
    stack = TextEncoder.from_pretrained(stack_path)
    for i, second in enumerate((structured, caption)):
        expected, expected_mask = stack.encode([caption], [second])
        n = int(expected_mask.sum())
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(feats[i, :n][mask[i, :n]], expected[0, :n][expected_mask[0, :n]])
    assert not torch.equal(feats[0], feats[1])  # the structured caption changed the T5 part


def test_an_export_names_the_encoders_the_shards_were_made_with_and_their_settings():
    """jobs.export's references: the encoder jobs.prepare recorded, with its kind and settings, when the run names the
    same path or none; another path named by the run, as it is; no text encoder for a model without text."""
    from jobs.export import references

    recorded = {"encoders": {"text_encoder": {"path": "/m/stack", "kind": "stack", "max_length": 128},
                             "vae": {"path": "/m/mel-vae", "scaling_factor": 0.69, "shift_factor": 0.0}}}
    same = references({"model": {"text_encoder": "/m/stack"}, "data": {}}, recorded)
    assert same["text_encoder"] == {"path": "/m/stack", "kind": "stack", "max_length": 128}
    assert same["vae"] == {"path": "/m/mel-vae", "scaling_factor": 0.69, "shift_factor": 0.0}
    assert references({"model": {}, "data": {}}, recorded)["text_encoder"]["kind"] == "stack"  # none named
    other = references({"model": {}, "data": {"text_encoder": "/m/t5"}}, recorded)
    assert other["text_encoder"] == {"path": "/m/t5"}
    assert "text_encoder" not in references({"model": {"class_names": ["a"]}}, recorded, text=False)


@pytest.mark.parametrize("text_width, encoder, preset, task, classes", [
    (None, None, "tiny-points", "class-points", 4),  # labels and no text: the label task, 4 classes from labels.json
    (16, None, "tiny-points", "t2p", None),  # text features in the shards: text
    (None, "te", "tiny-points", "t2p", None),  # a text encoder: text
    (None, None, "tiny", "class", 4),  # images alike (an ImageFolder prepared with read.label_from=folder)
    (None, None, "tiny-audio", "t2a", None),  # no class task for audio: text (the driver then asks for an encoder)
])
def test_a_presets_conditioning_follows_the_data(monkeypatch, text_width, encoder, preset, task, classes):
    from jobs.training.data import ShardCatalog
    from jobs.training.driver import base_model, resolve_task

    catalog = ShardCatalog("mem://data", [], {}, class_names=["chair", "lamp", "sofa", "table"])
    monkeypatch.setattr(ShardCatalog, "text_feature_width", lambda self: text_width)
    cfg = from_dict(TrainJobConfig, {"model": {"preset": preset}, "data": {"text_encoder": encoder}})
    mcfg = resolve_task(cfg, base_model(cfg), catalog)
    assert cfg.train.task == task
    if classes:
        assert (mcfg.conditioning, mcfg.num_classes, cfg.model.class_names) == ("class", 4, catalog.class_names)
    else:
        assert mcfg.conditioning == "text" and cfg.model.class_names is None
    pinned = from_dict(TrainJobConfig, {"model": {"preset": "tiny-points", "overrides": {"num_classes": 3}},
                                        "train": {"task": "class-points"}})
    with pytest.raises(ConfigError, match="the data has 4 classes .* has num_classes 3"):
        resolve_task(pinned, base_model(pinned), catalog)


@pytest.fixture
def world_of_one(monkeypatch):
    """A gloo process group of one in this process (what Ray Train sets up on each worker), torn down afterwards with
    the rendezvous variables it sets, so no later test inherits them."""
    from jobs.benchmarks.train import init_single_process_group

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded as unset before: monkeypatch removes it again afterwards
    init_single_process_group(torch.device("cpu"))
    yield
    torch.distributed.destroy_process_group()


def test_compiled_blocks_train_as_eager_under_zero3_with_checkpointing(world_of_one):
    """train.compile: the blocks' compiled forward runs inside DeepSpeed's ZeRO-3 gathers (whole blocks as leaves,
    every parameter partitioned) and under activation checkpointing, through a change of bucket shape, with the
    losses of the eager engine; the blocks share their graphs (no compile per block)."""
    import torch._dynamo

    from jobs.benchmarks.train import make_inputs
    from jobs.training.parallelize import parallelize
    from models.flow import flow_matching_loss

    def losses(compile_blocks: bool) -> list[float]:
        cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny"}, "optim": {"lr": 1e-2},
                                      "train": {"activation_checkpointing": True, "compile": compile_blocks},
                                      "deepspeed": {"torch_adam": True, "param_persistence_threshold": 0}})
        torch.manual_seed(0)
        model = NextDiT(preset("tiny", n_layers=4))
        with torch.no_grad():  # non-zero gates and modulation so every path of the block carries gradient
            for name, p in model.named_parameters():
                if "adaLN" in name or "gate" in name or "final_layer" in name:
                    p.normal_(std=0.02)
        engine = parallelize(model.train(), cfg, world=1)
        out = []
        for size in (128, 64, 128):
            x1, t, noise, feats, mask = make_inputs(preset("tiny"), size, 2, 8, "cpu")
            loss, _ = flow_matching_loss(engine, x1, feats, mask, t=t, noise=noise)
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = losses(False), losses(True)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 2, frames  # one graph per bucket shape (128², 64²), shared by the 4 blocks
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert eager[2] != eager[0]  # the optimizer moved the weights in between


@pytest.mark.parametrize("source", ["seeded t2i", "seeded class", "init_from"])
def test_partitioned_build_has_the_weights_of_the_plain_build(world_of_one, tmp_path, source):
    """deepspeed.zero_init: the model is built under zero.Init (every parameter a ZeRO-3 partition from construction
    on) with exactly the weights of the unpartitioned build: the seeded initialisation of either task, or the
    checkpoint of model.init_from scattered module by module."""
    import deepspeed

    from jobs.training.parallelize import build_model
    from tests.helpers import random_nextdit

    settings = {"model": {"preset": "tiny"}, "train": {"seed": 3},
                "deepspeed": {"torch_adam": True, "param_persistence_threshold": 0}}
    if source == "seeded class":
        settings.update(model={"preset": "tiny-class"}, train={"task": "class", "seed": 3})
    if source == "init_from":
        random_nextdit(preset("tiny"), seed=5).save_pretrained(str(tmp_path / "base"))
        settings["model"]["init_from"] = str(tmp_path / "base")
    cfg = from_dict(TrainJobConfig, settings)
    plain = build_model(cfg).state_dict()
    partitioned = build_model(cfg, world=1)
    params = list(partitioned.parameters())
    assert all(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params):
        for key, value in partitioned.state_dict().items():
            assert torch.equal(value, plain[key]), key
    # seeded: zero-initialised modulation (the reference init ran); init_from: the checkpoint's random modulation
    assert any(value.abs().sum() > 0 for key, value in plain.items() if "adaLN" in key) == (source == "init_from")


def _build_on_two_ranks(rank: int, port: int, folder: str, results) -> None:
    """One of two gloo ranks (spawned): builds the partitioned model, seeded and from ``folder``, and reports what it
    holds and whether the gathered weights equal the plain build's."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    from jobs.training.parallelize import build_model

    for init_from in (None, folder):
        cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny", "init_from": init_from},
                                      "deepspeed": {"torch_adam": True}})
        plain = build_model(cfg).state_dict()
        model = build_model(cfg, world=2)
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        total = sum(p.ds_numel for p in model.parameters())
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            same = all(torch.equal(value, plain[key]) for key, value in model.state_dict().items())
        results.put((rank, init_from is not None, held, total, same))
    torch.distributed.destroy_process_group()


def test_two_ranks_each_build_half_of_the_model_with_its_weights(tmp_path):
    """deepspeed.zero_init on two ranks (DeepSpeed's default persistence threshold): each rank holds half of the
    model from construction on, and the gathered weights are the plain build's — seeded, and model.init_from read by
    rank 0 alone and scattered."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port
    from tests.helpers import random_nextdit

    random_nextdit(preset("tiny"), seed=5).save_pretrained(str(tmp_path / "base"))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    ranks = [ctx.Process(target=_build_on_two_ranks, args=(r, port, str(tmp_path / "base"), results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    reports = [results.get(timeout=300) for _ in range(4)]
    for p in ranks:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in ranks)
    assert sorted((r, init) for r, init, *_ in reports) == [(0, False), (0, True), (1, False), (1, True)]
    for _, _, held, total, same in reports:
        assert held == total // 2 and same


def test_an_audio_preset_trains_the_audio_rows_with_the_t2a_task(tmp_path, capsys):
    """jobs.train picks the task and the manifest rows from the model's modality; a mismatch is a config error."""
    from jobs.training.driver import validate
    from jobs.training.tasks import TextToAudio, make_task

    data = _tiny_shards(tmp_path / "audio", modality="audio", bucket="2.0s", shape=(20, 31))
    base = ["--data", str(data), "--storage", str(tmp_path / "runs"), "--preset", "tiny-audio", "--steps", "2"]
    assert run_train(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "task t2a" in out and "bucket 2.0s" in out
    assert "trained on: area 31 tokens, sides [1, 1, 31]" in out  # one row of 31 latent frames

    cfg = from_dict(TrainJobConfig, {"data": {"uri": str(data)}, "run": {"storage": str(tmp_path / "runs")},
                                     "model": {"preset": "tiny-audio"}})
    catalog = validate(cfg, write_probe=False)
    assert (cfg.data.modality, cfg.train.task) == ("audio", "t2a")
    task = make_task(cfg, catalog, torch.device("cpu"))
    assert isinstance(task, TextToAudio)
    samples = [{"key": f"{i:016x}", "tensor": np.full((20, 31), i, np.float16), "meta": {"member": C.LATENT_MEMBER},
                "text_features": np.zeros((3, 32), np.float16)} for i in range(2)]
    batch = task.build(samples, epoch=0)
    assert batch.x1.shape == (2, 20, 1, 31) and batch.noise.shape == batch.x1.shape  # (C, 1, T): one row of frames
    assert torch.equal(batch.x1[1], torch.ones(20, 1, 31))

    with pytest.raises(ConfigError, match="lists no image shards"):  # an image preset on audio-only data
        run_train([*base[:4], "--preset", "tiny", "--steps", "2"])
    with pytest.raises(ConfigError, match="train.task t2i trains text-conditioned image models, but the model"):
        run_train(base + ["--set", "train.task=t2i"])
    with pytest.raises(ConfigError, match="data.modality is image, but the model .* is an audio model"):
        run_train(base + ["--set", "data.modality=image"])
    mel = _tiny_shards(tmp_path / "mel", modality="audio", bucket="2.0s", member=C.MEL_MEMBER, shape=(80, 126))
    with pytest.raises(ConfigError, match="log-mel spectrograms .* encode.audio_vae"):
        run_train(["--data", str(mel), *base[2:]])


# ---- wandb mode and secrets on a cluster (docs/training.md#credentials-on-a-cluster) --------------------------------
def test_wandb_mode_comes_from_the_config_else_the_environment(monkeypatch):
    from jobs.training.metrics import wandb_mode

    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")  # the README's / RayJob's switch takes effect
    assert wandb_mode(None) == ("online", "WANDB_MODE")
    assert wandb_mode("disabled") == ("disabled", "logging.wandb")  # a mode written in the config is a choice
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode(None)[0] == "disabled"
    monkeypatch.delenv("WANDB_DISABLED")
    monkeypatch.setenv("WANDB_MODE", "loud")
    with pytest.raises(ConfigError, match="WANDB_MODE='loud'"):
        wandb_mode(None)
    with pytest.raises(ConfigError, match="logging.wandb must be one of"):
        from_dict(TrainJobConfig, {"data": {"uri": "x"}, "run": {"storage": "y"},
                                   "logging": {"wandb": "loud"}}).validate()


def test_the_progress_bar_of_a_worker_is_drawn_by_the_driver(tmp_path, monkeypatch, capsys):
    """Rank 0's bar is Ray's tqdm: inside a Ray worker it prints its state as one JSON line (position, step, total,
    loss) that the driver's log monitor draws, never tqdm's carriage-return redraws, which Ray's per-line log prefixes
    garble."""
    import json

    import ray

    from jobs.training.metrics import MetricsSink

    monkeypatch.setattr(ray._private.worker.global_worker, "mode", ray.WORKER_MODE)
    sink = MetricsSink(str(tmp_path), 20, 4, {}, "disabled", "p", "r", progress=True)
    sink.log(10, {"loss": 0.25, "bucket": "32x32"})
    sink.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines and "\r" not in "".join(lines)
    states = [json.loads(line) for line in lines]
    assert states[-1]["x"] == 10 and states[-1]["total"] == 20 and states[-1]["closed"]
    assert "loss 0.2500" in states[-1]["desc"] and "32x32" in states[-1]["desc"]
    assert sink.bar.n == 10


def test_rank_0_metrics_reach_prometheus_through_rays_metrics_agent(ray_cluster, tmp_path):
    """Inside a Ray worker, MetricsSink sets the training gauges (tagged with the run) that the node's metrics agent
    serves to Prometheus as ray_lumina_train_* (infra/observability/ draws them)."""
    import time
    import urllib.request

    from jobs.training.metrics import MetricsSink

    @ray_cluster.remote(num_cpus=0)
    def log_a_step(run_dir: str) -> None:
        sink = MetricsSink(run_dir, 10, 0, {}, "disabled", "p", "gauge-run", progress=False)
        sink.log(3, {"loss": 0.25, "samples_per_s": 12.5, "bucket": "32x32"})
        sink.log_eval(3, {"latent_fd": 1.5})  # the in-training evaluation's numbers: one gauge tagged by metric
        deadline = time.time() + 60  # the gauges live with this worker: it stays until the test has read them
        while not os.path.exists(os.path.join(run_dir, "read")) and time.time() < deadline:
            time.sleep(0.2)

    running = log_a_step.remote(str(tmp_path))
    url = f"http://127.0.0.1:{ray_cluster._private.worker.global_worker.node.metrics_export_port}/metrics"
    wanted = {"ray_lumina_train_loss": 0.25, "ray_lumina_train_step": 3.0, "ray_lumina_train_samples_per_s": 12.5,
              "ray_lumina_train_eval": 1.5}
    found: dict[str, float] = {}
    deadline = time.time() + 60
    while set(found) != set(wanted) and time.time() < deadline:
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and 'run="gauge-run"' in line and (name != "ray_lumina_train_eval"
                                                                 or 'metric="latent_fd"' in line):
                found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    (tmp_path / "read").touch()
    ray_cluster.get(running)
    assert found == wanted


def test_offline_wandb_run_is_copied_into_remote_storage(tmp_path, monkeypatch):
    """With storage wandb cannot write (s3://; here fsspec's memory://), the offline run is written to a local staging
    folder and lands under {run}/wandb/offline-run-* at a checkpoint and after the end, ready for `wandb sync`."""
    import uuid

    import fsspec

    from jobs.training.metrics import MetricsSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    run_dir = f"memory://runs-{uuid.uuid4().hex[:8]}/wandb-test"
    sink = MetricsSink(run_dir, 2, 0, {"x": 1}, None, "lumina-test", "wandb-test", progress=False)
    assert sink.wandb_mode == "offline" and sink.wandb_dir.startswith(str(tmp_path))
    sink.log(1, {"loss": 0.5})
    # an in-training evaluation's numbers and samples go to the same run (evaluation.py), under eval/
    sink.log_eval(1, {"latent_fd": 2.5}, {"samples": [("image", np.zeros((16, 16, 3), np.uint8), "a red cat"),
                                                      ("audio", (np.zeros(1600, np.float32), 16000), "a tone")]})
    sink.flush("a", checkpoint=True)
    fs = fsspec.filesystem("memory")
    root = run_dir.split("://", 1)[1]
    assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/wandb", detail=False)][0].startswith("offline-run-")
    sink.close()
    (run,) = fs.ls(f"{root}/wandb", detail=False)
    assert any(p.endswith(".wandb") for p in fs.find(run))
    media = [p.rsplit("/media/", 1)[1] for p in fs.find(run) if "/media/" in p]
    assert any(m.startswith("images/eval/samples") for m in media), media
    assert any(m.startswith("audio/eval/samples") for m in media), media
    assert not fs.exists(f"{root}/wandb/latest-run")  # wandb's symlinks stay behind


def test_no_secret_reaches_the_runtime_env_the_job_config_or_the_logs(tmp_path, monkeypatch, capsys, caplog):
    """Credentials come from the nodes' own environment: fake secret values in the driver's environment appear neither
    in the workers' runtime env, nor in the pickled trainer (its config, RunConfig and storage filesystem), nor in the
    --dry-run's output and logs; the non-secret switches are forwarded."""
    import logging

    import ray.cloudpickle

    from jobs.training.driver import build_trainer, validate

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0001", "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-0002",
               "AWS_SESSION_TOKEN": "fake-session-token-0003", "WANDB_API_KEY": "fake-wandb-key-0004",
               "HF_TOKEN": "hf_fakehubtoken0005"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the dry-run warns and goes on
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # (without botocore's retries)
    monkeypatch.setenv("WANDB_MODE", "online")
    data = _tiny_shards(tmp_path / "data")
    caplog.set_level(logging.DEBUG)
    assert run_train(["--data", str(data), "--storage", "s3://bucket/runs", "--preset", "tiny", "--steps", "2",
                      "--log-level", "DEBUG", "--dry-run"]) == 0
    cfg = from_dict(TrainJobConfig, {"data": {"uri": str(data)}, "model": {"preset": "tiny"},
                                     "run": {"storage": "s3://bucket/runs"}})
    validate(cfg, write_probe=False)
    trainer = build_trainer(cfg)
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["WANDB_MODE"] == "online"
    assert not set(env) & set(secrets)
    pickled = ray.cloudpickle.dumps(trainer)
    seen = capsys.readouterr()
    for key, value in secrets.items():
        assert value.encode() not in pickled, key
        assert value not in seen.out + seen.err + caplog.text, key


def test_relative_output_paths_are_refused_under_ray_job_submit(monkeypatch, tmp_path):
    """A `ray job submit` entrypoint runs in Ray's temporary copy of the working dir: a relative output path there is
    lost with the session, so every job refuses one before any work (outside a job it is a plain local path)."""
    from jobs.export import main as export
    from jobs.generate import main as generate
    from jobs.prepare import main as prepare
    from jobs.runtime import RAY_JOB_ENV
    from jobs.train import main as train

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    calls = [(train, ["--data", str(tmp_path), "--storage", "runs/", "--dry-run"], "--storage 'runs/'"),
             (prepare, ["--input", str(tmp_path), "--output", "curated", "--dry-run"], "--output 'curated'"),
             (generate, ["--model", str(tmp_path), "--prompt", "x", "--out", "out", "--dry-run"], "--out 'out'"),
             (export, [str(tmp_path), "model"], "out_dir 'model'")]
    for main, argv, named in calls:
        with pytest.raises(ConfigError, match=f"{named} is a relative path: under `ray job submit`"):
            main(argv)
    with pytest.raises(ConfigError, match="no manifest.parquet"):  # an absolute path passes the check
        train(["--data", str(tmp_path), "--storage", str(tmp_path / "runs"), "--dry-run"])
    monkeypatch.delenv(RAY_JOB_ENV)
    with pytest.raises(ConfigError, match="no manifest.parquet"):  # outside a job a relative path is fine
        train(["--data", str(tmp_path), "--storage", "runs/", "--dry-run"])


def test_a_resume_on_another_worker_count_keeps_the_global_batch(tmp_path, caplog):
    """The checkpoint's workers × grad_accum micro-batches per step are kept by setting grad_accum (and logged); a
    count that cannot split them is a config error; keep_global_batch=false lets the batch follow the workers."""
    from jobs.training.driver import keep_global_batch

    checkpoint = tmp_path / "runs" / "nextdit" / "checkpoint_00000040"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 40, "world": 2, "grad_accum": 2}))

    def config(workers: int, **train) -> TrainJobConfig:
        return from_dict(TrainJobConfig, {"run": {"storage": str(tmp_path / "runs")}, "scaling": {"workers": workers},
                                          "train": train})

    fresh = from_dict(TrainJobConfig, {"run": {"storage": str(tmp_path / "other")}, "scaling": {"workers": 3}})
    keep_global_batch(fresh)
    assert fresh.train.grad_accum == 1  # no checkpoint: nothing to keep
    for workers, accum in ((1, 4), (4, 1), (2, 2)):
        cfg = config(workers)
        keep_global_batch(cfg)
        assert cfg.train.grad_accum == accum
    assert "grad_accum 4 keeps the global batch of 4 micro-batches" in caplog.text
    with pytest.raises(ConfigError, match="4 micro-batches per step, which 3 workers cannot split evenly"):
        keep_global_batch(config(3))
    changed = config(3, keep_global_batch=False)
    keep_global_batch(changed)
    assert changed.train.grad_accum == 1 and "changes from 4 to 3 micro-batches" in caplog.text


# ---- in-training evaluation (jobs/training/evaluation.py, docs/training.md#in-training-evaluation) ------------------
def _eval_config(data: Path, **eval_section) -> TrainJobConfig:
    section = {"every": 2, "prompts": ["a red cat", "a blue dog"], "seeds": [0], "reference_samples": 4,
               "sampler": {"steps": 2, "width": 128, "height": 128}, **eval_section}
    return from_dict(TrainJobConfig, {"data": {"uri": str(data), "modality": "image"},
                                      "model": {"preset": "tiny"}, "train": {"steps": 4, "task": "t2i"},
                                      "run": {"storage": str(data.parent / "runs"), "name": "r"}, "eval": section})


def test_eval_config_is_checked_before_any_worker_starts(tmp_path, capsys):
    """Off by default; its own values (validate), then against the model and the data on the driver (check_eval):
    prompts a text model can read and an encoder to read them, labels within a class model's classes, a VAE for
    audio, the modality's size fields, scorers that import; a prompt file is read into the prompts."""
    from jobs.training.evaluation import check_eval

    assert TrainJobConfig().eval.every == 0
    data = tmp_path / "data"
    for section, message in [({"every": -1}, "eval.every must be >= 0"),
                             ({"seeds": []}, "eval.seeds must name at least one seed"),
                             ({"class_labels": [-1]}, "class indices >= 0"),
                             ({"scorers": ["no_function"]}, "is not 'package.module:function'")]:
        with pytest.raises(ConfigError, match=message):
            _eval_config(data, **section).validate()
    with pytest.raises(ConfigError, match=r"eval.use_ema=true needs the EMA"):
        from_dict(TrainJobConfig, {"data": {"uri": "d"}, "run": {"storage": "s"}, "ema": {"enabled": False},
                                   "eval": {"use_ema": True}}).validate()

    text, image_vae = preset("tiny"), {"vae": {"path": "vae"}, "text_encoder": {"path": "te"}}
    check_eval(_eval_config(data), image_vae, text)  # passes
    for section, encoders, mcfg, message in [
        ({"prompts": []}, image_vae, text, "eval.prompts .* is empty"),
        ({"class_labels": [1]}, image_vae, text, "eval.class_labels is for class-conditional models"),
        ({}, {"vae": {"path": "vae"}}, text, "reads its prompts with a text encoder, but the run names none"),
        ({"sampler": {"duration": 1.0}}, image_vae, text, r"sets duration, but the model \(image\) takes width / height"),
        ({"sampler": {"width": 100, "height": 128}}, image_vae, text, "width 100 must be a positive multiple of 16"),
        ({"prompts": [], "class_labels": [12]}, {}, preset("tiny-class"), r"the model has 10 classes \(0..9\)"),
        ({"prompts": ["tabby"]}, {}, preset("tiny-class"), "'tabby' is neither a class index below 10"),
        ({"prompts": ["a tone"], "sampler": {"steps": 2}}, {"text_encoder": {"path": "te"}}, preset("tiny-audio"),
         "decodes with the mel VAE"),
        ({"scorers": ["jobs.demo_data:no_such_scorer"]}, image_vae, text, "cannot load 'jobs.demo_data:no_such"),
        ({"clip_model": "clip", "sampler": {"steps": 2}}, {"text_encoder": {"path": "te"}}, preset("tiny-points"),
         "a point-cloud model gets MMD"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_eval(_eval_config(data, **section), encoders, mcfg)
    check_eval(_eval_config(data, prompts=["7"], class_labels=[3]), {}, preset("tiny-class"))
    (tmp_path / "prompts.txt").write_text('a green cat\n{"prompt": "a yellow dog", "seed": 3}\n')
    cfg = _eval_config(data, prompt_file=str(tmp_path / "prompts.txt"))
    check_eval(cfg, image_vae, text)
    assert cfg.eval.prompts == ["a red cat", "a blue dog", "a green cat", "a yellow dog"]
    assert cfg.eval.prompt_file is None
    # through jobs.train: --set, the driver's checks, the --dry-run line
    _tiny_shards(data)
    base = ["--data", str(data), "--storage", str(tmp_path / "runs"), "--preset", "tiny", "--steps", "10",
            "--set", "eval.every=5", "--dry-run"]
    with pytest.raises(ConfigError, match="eval.prompts .* is empty"):
        run_train(base)
    assert run_train(base + ["--set", "eval.prompts=[a red cat]", "--set", "model.text_encoder=te",
                             "--set", "eval.sampler.steps=3"]) == 0
    assert f"eval: every 5 steps and at the last, 1 prompt(s) × 1 seed(s) with the EMA weights, 3 midpoint steps, " \
           f"to {tmp_path / 'runs'}/nextdit/eval/" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    root = tmp_path_factory.mktemp("eval-encoders")
    return make_tiny_text_encoder(root / "text-encoder"), make_tiny_vae(root / "vae")


def test_eval_generates_stores_and_scores_the_fixed_set_with_the_ema_weights(tmp_path, tiny_encoders):
    """The Evaluator without Ray or DeepSpeed (a world of one: the gathers are copies): at the due steps it stores each
    prompt × seed as a PNG with its JSON sidecar and a grid under eval/step_*/, one metrics.jsonl row per evaluation
    (latent_fd against the shards' latents, and the configured scorer's number) and curve.png; the samples are those
    of the EMA weights with the fixed seeds (regenerated bit for bit); a resumed attempt keeps the rows up to its
    start and evaluates the later steps again."""
    from PIL import Image

    from jobs.training.evaluation import Evaluator, check_eval, read_rows
    from jobs.training.parallelize import ShardedEMA, build_model
    from jobs.training.tasks import make_task
    from models.sampler import GenerationRequest, Sampler
    from models.tiny import make_tiny_clip

    text_encoder, vae = tiny_encoders
    data = _tiny_shards(tmp_path / "data", samples=6)
    cfg = _eval_config(data, scorers=["jobs.demo_data:colour_fidelity"]).validate()
    cfg.model.text_encoder, cfg.model.vae = text_encoder, vae
    cfg.eval.clip_model = make_tiny_clip(tmp_path / "clip")
    catalog = ShardCatalog.from_config(cfg.data)
    mcfg = preset("tiny")
    check_eval(cfg, catalog.encoders, mcfg)
    task = make_task(cfg, catalog, torch.device("cpu"))
    model = build_model(cfg)
    ema = ShardedEMA(model, 0.5)
    run_dir = tmp_path / "runs" / "r"
    evaluator = Evaluator(cfg, task, catalog, mcfg, str(run_dir), 0, torch.device("cpu"))
    rows = []
    for step in range(1, 5):
        with torch.no_grad():  # a stand-in for a training step: the EMA now differs from the raw weights
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ema.update()
        rows.append(evaluator(step, model, ema))
    assert rows[0] is None and rows[2] is None  # every 2 steps
    assert [r["step"] for r in read_rows(str(run_dir / "eval"))] == [2, 4]
    last = read_rows(str(run_dir / "eval"))[-1]
    assert last["weights"] == "ema" and last["samples"] == 2 and last["dir"] == "step_00000004"
    assert last["latent_fd"] > 0 and 0 <= last["colour_fidelity"] <= 1 and 0 <= last["clip_score"] <= 100
    step_dir = run_dir / "eval" / "step_00000004"
    assert sorted(p.name for p in step_dir.iterdir()) == ["000000_0.json", "000000_0.png", "000001_0.json",
                                                         "000001_0.png", "grid.png"]
    assert json.loads((step_dir / "000001_0.json").read_text())["prompt"] == "a blue dog"
    # loss, clip_score | colour_fidelity, latent_fd
    assert Image.open(run_dir / "eval" / "curve.png").size == (1120, 680)
    # the fixed seeds on the EMA weights give exactly the stored samples
    weights = NextDiT.from_state_dict(mcfg, ema.full_state())
    again = Sampler.from_model(weights, {"text_encoder": text_encoder, "vae": vae}, config=cfg.eval.sampler)
    result = again.generate([GenerationRequest("a blue dog", seed=0)])[0]
    assert np.array_equal(np.asarray(Image.open(step_dir / "000001_0.png")), result.image)
    # a resumed attempt (from step 2) keeps row 2 and evaluates step 4 again
    resumed = Evaluator(cfg, task, catalog, mcfg, str(run_dir), 0, torch.device("cpu"), start_step=2)
    assert [r["step"] for r in resumed.rows] == [2]


def test_eval_numbers_and_a_lora_runs_weights():
    """latent_fd is 0 for one set against itself and grows with a shift of the mean (‖d‖² per channel); point clouds
    get MMD-CD / COV-CD; a LoRA run's gathered weights (frozen base + adapters, peft's names) build a sampling model
    that computes what the training module computes."""
    from jobs.training.evaluation import build_model, builtin_metrics, gather_weights, latent_fd
    from jobs.training.lora import apply_lora
    from models.tiny import random_nextdit

    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8, 8, generator=gen) for _ in range(8)]
    assert latent_fd(latents, latents) == pytest.approx(0.0, abs=1e-6)
    shifted = [x + 0.5 for x in latents]
    assert latent_fd(shifted, latents) == pytest.approx(4 * 0.25, rel=1e-3)
    clouds = [torch.randn(3, 1, 64, generator=gen) for _ in range(4)]
    numbers = builtin_metrics("points", clouds, clouds)
    assert numbers["mmd_cd"] == pytest.approx(0.0, abs=1e-6) and numbers["cov_cd"] == 1.0
    assert builtin_metrics("image", latents, []) == {}

    cfg = from_dict(TrainJobConfig, {"model": {"preset": "tiny"}, "lora": {"enabled": True, "rank": 2}})
    trained = apply_lora(random_nextdit(preset("tiny")), cfg.lora)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    state = gather_weights(trained)
    assert any("lora_B" in name for name in state) and len(state) == len(dict(trained.named_parameters()))
    rng = torch.get_rng_state()
    model = build_model(state, cfg, preset("tiny"), torch.device("cpu"), None)
    assert torch.equal(rng, torch.get_rng_state())  # its throw-away initialisation left the training's RNG alone
    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([0.3])
    caption, mask = torch.randn(1, 3, 32, generator=gen), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, caption, mask), trained.eval()(x, t, caption, mask))
