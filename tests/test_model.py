"""Next-DiT behaviour users rely on: batching, backends, variants, initialisation, checkpointing, formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models import ContextDrop, NextDiT, NextDiTConfig, RopeScaling, preset
from models.attention import attention, pool_tokens
from models.checkpoint import read_checkpoint
from models.config_io import ConfigError
from models.formats import CheckpointError
from tests.helpers import caption_batch, random_nextdit


@pytest.fixture(scope="module")
def tiny():
    return random_nextdit(preset("tiny"))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_list_batch_equals_samples_run_one_by_one(backend):
    model = random_nextdit(preset("tiny", attention_backend=backend))
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 16, 16, generator=gen), torch.randn(4, 8, 20, generator=gen),
              torch.randn(4, 12, 4, generator=gen)]
    t = torch.tensor([0.1, 0.5, 0.9])
    feats, mask = caption_batch(3, 6, 32, [6, 2, 4])
    with torch.no_grad():
        together = model(images, t, feats, mask)
        for b, img in enumerate(images):
            alone = model([img], t[b : b + 1], feats[b : b + 1, : int(mask[b].sum())], mask[b : b + 1, : int(mask[b].sum())])
            assert together[b].shape == img.shape
            torch.testing.assert_close(together[b], alone[0], rtol=1e-5, atol=1e-6)


def test_attention_backends_agree_with_mask_gqa_and_per_sample_scale():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 10, 8, 16, generator=gen), torch.randn(3, 12, 2, 16, generator=gen), torch.randn(3, 12, 2, 16, generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    scale = torch.tensor([0.2, 0.25, 0.3])
    reference = attention(q, k, v, mask, scale, backend="math")
    torch.testing.assert_close(attention(q, k, v, mask, scale, backend="sdpa"), reference, rtol=1e-5, atol=1e-5)
    # the masked keys do not matter
    k2 = k.clone()
    k2[1, 7:] = 100.0
    torch.testing.assert_close(attention(q, k2, v, mask, scale, backend="sdpa"), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="xformers")


def test_pool_tokens_averages_windows_on_each_sample_grid():
    x = torch.arange(2 * 12 * 1 * 1, dtype=torch.float32).view(2, 12, 1, 1)
    # sample 0: a 3×4 grid; sample 1: a 2×2 grid (padded after 4 tokens)
    pooled, mask = pool_tokens(x, [(1, 3, 4), (1, 2, 2)], kernel=2)
    grid0 = x[0, :, 0, 0].view(3, 4)
    expected0 = torch.tensor([grid0[:2, :2].mean(), grid0[:2, 2:].mean(), grid0[2:, :2].mean(), grid0[2:, 2:].mean()])
    assert torch.allclose(pooled[0, :, 0, 0], expected0)  # edge windows average only what they cover
    assert torch.allclose(pooled[1, :1, 0, 0], x[1, :4, 0, 0].mean().view(1))
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]


def test_context_drop_pools_the_first_blocks_by_time(tiny):
    drop = ContextDrop(min_tokens=16)
    assert [drop.pooled_blocks(t, 10) for t in (0.0, 0.25, 0.5, 1.0)] == [10, 8, 5, 0]
    calls = []
    for i, block in enumerate(tiny.layers):
        block.attention.register_forward_pre_hook(lambda mod, args, i=i: calls.append((i, args[-1] is not None)))
    x = torch.randn(1, 4, 16, 16)
    feats, mask = caption_batch(1, 4, 32)
    with torch.no_grad():
        for t, expected in [(0.0, [True, True]), (0.5, [True, False]), (1.0, [False, False])]:
            calls.clear()
            tiny(x, torch.tensor([t]), feats, mask, context_drop=drop)
            assert [pooled for _, pooled in calls] == expected
        calls.clear()
        tiny(x[:, :, :4, :4], torch.tensor([0.0]), feats, mask, context_drop=drop)  # 4 tokens < threshold: no drop
        assert [pooled for _, pooled in calls] == [False, False]
    for block in tiny.layers:
        block.attention._forward_pre_hooks.clear()


def test_zero_initialised_model_predicts_zero_and_blocks_are_identity():
    model = NextDiT(preset("tiny")).eval()
    x = torch.randn(2, 4, 16, 16)
    feats, mask = caption_batch(2, 4, 32)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, torch.rand(2), feats, mask)) == 0
        h = torch.randn(2, 64, 64)
        rope = model.rope_tables([(1, 8, 8)] * 2, torch.rand(2), None, 64, "cpu")
        c = torch.randn(2, 64)
        assert torch.equal(model.layers[0](h, None, rope, feats, mask, c, None), h)
    gates = [b.attention.gate for b in model.layers]
    assert all(torch.count_nonzero(g) == 0 for g in gates)


def test_class_conditional_variant():
    model = random_nextdit(preset("tiny-class"))
    assert not hasattr(model.layers[0].attention, "wk_y")
    assert model.layers[0].attention_norm1.weight is None  # parameter-free pre-norm (ImageNet Next-DiT)
    x = torch.randn(3, 4, 16, 16)
    labels = torch.tensor([0, 3, model.config.num_classes])  # last one is the null class
    with torch.no_grad():
        out = model(x, torch.rand(3), labels=labels)
        other = model(x, torch.rand(3), labels=torch.tensor([1, 3, 2]))
    assert out.shape == x.shape and not torch.allclose(out[0], other[0])
    with pytest.raises(ValueError, match="needs labels"):
        model(x, torch.rand(3))


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_nextdit(preset("tiny")).train()
    x = torch.randn(2, 4, 16, 16)
    feats, mask = caption_batch(2, 4, 32, [4, 2])
    t = torch.rand(2)

    def grads():
        model.zero_grad()
        model(x, t, feats, mask).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_activation_checkpointing(True)
    assert all(b.activation_checkpointing for b in model.layers)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_frames_axis_video_shaped_input():
    cfg = preset("tiny", rope_axes_dims=(4, 6, 6))
    model = random_nextdit(cfg)
    x = torch.randn(1, 4, 3, 8, 8)  # (B, C, F, H, W)
    feats, mask = caption_batch(1, 4, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([0.5]), feats, mask)
        # the frame axis is really encoded: permuting frames changes each frame's output
        swapped = model(x[:, :, [1, 0, 2]], torch.tensor([0.5]), feats, mask)
    assert out.shape == x.shape
    assert not torch.allclose(out[:, :, 0], swapped[:, :, 1], atol=1e-6)


def test_extrapolation_changes_only_beyond_training_size(tiny):
    feats, mask = caption_batch(1, 4, 32)
    with torch.no_grad():
        small = torch.randn(1, 4, 16, 16)
        assert torch.equal(tiny(small, torch.tensor([0.2]), feats, mask),
                           tiny(small, torch.tensor([0.2]), feats, mask, rope_scaling=RopeScaling("pi")))
        large = torch.randn(1, 4, 16, 40)  # 8×20 tokens: past the longest trained side (16, the 4:1 bucket's)
        assert not torch.allclose(tiny(large, torch.tensor([0.2]), feats, mask),
                                  tiny(large, torch.tensor([0.2]), feats, mask, rope_scaling=RopeScaling("pi")))


def test_bad_inputs_and_configs_get_clear_errors(tiny):
    feats, mask = caption_batch(1, 4, 16)
    with pytest.raises(ValueError, match=r"expected \(1, L, 32\)"):
        tiny(torch.randn(1, 4, 16, 16), torch.tensor([0.5]), feats, mask)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tiny(torch.randn(1, 4, 15, 16), torch.tensor([0.5]), *caption_batch(1, 4, 32))
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="not divisible"):
        preset("tiny", n_heads=5)
    with pytest.raises(ConfigError, match="unknown config key"):
        preset("tiny", hidden=3)


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in NextDiT(preset(name)).parameters()) for name in ("2B", "2B-GQA")}
    assert sizes["2B"] / 1e9 == pytest.approx(1.989, abs=0.002)
    assert sizes["2B-GQA"] / 1e9 == pytest.approx(1.627, abs=0.002)
    assert preset("2B").ffn_hidden_dim == 6144 and preset("imagenet-600M").ffn_hidden_dim == 4096


def test_our_folder_round_trip_with_ema_and_metadata(tiny, tmp_path):
    ema = {k: v + 1 for k, v in tiny.state_dict().items()}
    tiny.save_pretrained(str(tmp_path / "m"), ema_state=ema, metadata={"vae": "some/vae"})
    raw = NextDiT.from_pretrained(str(tmp_path / "m"))
    averaged = NextDiT.from_pretrained(str(tmp_path / "m"), ema=True)
    assert read_checkpoint(str(tmp_path / "m"), tensors=False).metadata == {"vae": "some/vae"}
    for key, value in tiny.state_dict().items():
        assert torch.equal(raw.state_dict()[key], value)
        assert torch.equal(averaged.state_dict()[key], ema[key])
    with pytest.raises(FileNotFoundError):
        NextDiT.from_pretrained(str(tmp_path / "nothing"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="no Next-DiT checkpoint"):
        NextDiT.from_pretrained(str(tmp_path / "junk"))


def test_load_and_save_on_s3(tiny, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/models/tiny"
    tiny.save_pretrained(url, fmt="official")
    loaded = NextDiT.from_pretrained(url)
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_remote_writes_upload_only_when_complete_and_reads_fetch_what_they_need(tiny, s3_bucket, tmp_path):
    """storage.staged_output uploads a folder only when its block succeeds; local_copy fetches the chosen files."""
    from models.storage import filesystem, local_copy, staged_output

    fs, _ = filesystem(f"s3://{s3_bucket}")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_output(f"s3://{s3_bucket}/half") as local:
            (Path(local) / "part.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert not fs.exists(f"{s3_bucket}/half")  # nothing partial in the bucket
    tiny.save_pretrained(f"s3://{s3_bucket}/m", ema_state=tiny.state_dict())
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/m")) == [
        "config.json", "ema.safetensors", "model.safetensors"]
    with local_copy(f"s3://{s3_bucket}/m", include=lambda rel: rel.endswith(".json")) as local:
        assert sorted(os.listdir(local)) == ["config.json"]
    assert not os.path.exists(local)  # a one-use copy is removed after the block
    with local_copy(str(tmp_path)) as same:
        assert same == str(tmp_path)  # a local path is used where it is


@pytest.mark.parametrize("fmt", ["ours", "official", "diffusers"])
def test_read_config_reads_no_weights_locally_or_on_s3(tiny, fmt, s3_bucket, tmp_path, monkeypatch):
    """What training reads of ``model.init_from`` on the driver and on every worker before the weights: the
    architecture, from a local or s3:// checkpoint of any format, without reading a weights file."""
    from models import checkpoint

    url = f"s3://{s3_bucket}/models/{fmt}"
    tiny.save_pretrained(str(tmp_path / fmt), fmt=fmt)
    tiny.save_pretrained(url, fmt=fmt)

    def no_weights(*args, **kwargs):
        raise AssertionError("read_config read a weights file")

    monkeypatch.setattr(checkpoint, "load_file", no_weights)
    assert checkpoint.read_config(str(tmp_path / fmt)) == tiny.config
    assert checkpoint.read_config(url) == tiny.config
    with pytest.raises(FileNotFoundError):
        checkpoint.read_config(f"s3://{s3_bucket}/models/nothing")


def test_vae_and_text_encoder_load_from_s3_through_the_local_cache(s3_bucket, tmp_path, monkeypatch):
    from models.storage import filesystem
    from models.text_encoder import TextEncoder
    from models.vae import ImageVAE
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    monkeypatch.setenv("LUMINA_CACHE", str(tmp_path / "cache"))
    fs, _ = filesystem(f"s3://{s3_bucket}")
    for name, build in (("vae", make_tiny_vae), ("te", make_tiny_text_encoder)):
        local = build(tmp_path / name)
        fs.put(local + "/", f"{s3_bucket}/models/{name}/", recursive=True)
    vae = ImageVAE.from_pretrained(f"s3://{s3_bucket}/models/vae")
    reference = ImageVAE.from_pretrained(str(tmp_path / "vae"))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(vae.encode(images, sample=False), reference.encode(images, sample=False))
    encoder = TextEncoder.from_pretrained(f"s3://{s3_bucket}/models/te")
    feats, mask = encoder.encode(["a red cat"])
    assert feats.shape[0] == 1 and mask.sum() > 1
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2  # each folder fetched once, then reused
    with pytest.raises(FileNotFoundError):
        ImageVAE.from_pretrained(f"s3://{s3_bucket}/models/missing")


def test_torch_compile_graph_breaks_do_not_grow_with_depth():
    """Host-side checks (RoPE tables, the all-true caption mask) happen once per call, never per block: the blocks of
    a compiled forward form one graph however deep the model and whether or not captions are padded."""
    def breaks(n_layers: int, valid: list[int]) -> int:
        cfg = NextDiTConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, multiple_of=16, cap_feat_dim=32,
                            train_grid=(1, 8, 8))
        feats, mask = caption_batch(2, 9, 32, valid=valid)
        torch._dynamo.reset()
        return torch._dynamo.explain(random_nextdit(cfg))(torch.randn(2, 4, 16, 16), torch.rand(2), feats,
                                                          mask).graph_break_count

    assert breaks(2, [9, 4]) == breaks(5, [9, 4]) == breaks(5, [9, 9])
