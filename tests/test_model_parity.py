"""Parity with the published implementation (diffusers' LuminaNextDiT2DModel) and checkpoint round trips."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from models import NextDiT, NextDiTConfig
from models.checkpoint import read_checkpoint, read_config, write_checkpoint
from models.formats import CheckpointError
from models.rope import OFFICIAL_SWITCH_WATERSHED, NDRotaryEmbedding, RopeScaling
from tests.helpers import caption_batch, randomise

LuminaNextDiT2DModel = pytest.importorskip("diffusers").LuminaNextDiT2DModel
get_2d_rotary_pos_embed_lumina = pytest.importorskip("diffusers.models.embeddings").get_2d_rotary_pos_embed_lumina

SMALL = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "num_layers": 2,
         "num_attention_heads": 4, "num_kv_heads": 2, "multiple_of": 16, "cross_attention_dim": 24, "learn_sigma": True,
         "qk_norm": True}
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def diffusers_forward(peer, x, t, feats, mask, **rope_factors):
    """The peer as its pipeline calls it: RoPE table of 384² positions (scaled by ``rope_factors``: linear_factor,
    ntk_factor), proportional attention base (size/16)²."""
    head_dim = peer.config.hidden_size // peer.config.num_attention_heads
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, **rope_factors)
    base = (peer.config.sample_size // peer.config.patch_size) ** 2
    out = peer(x, t, feats, mask, rope, cross_attention_kwargs={"base_sequence_length": base}, return_dict=False)[0]
    return out[:, : peer.config.in_channels]


def make_peer(folder, **overrides):
    """A randomised diffusers model of the SMALL config (with ``overrides``), saved to ``folder``."""
    torch.manual_seed(0)
    peer = randomise(LuminaNextDiT2DModel(**{**SMALL, **overrides}).eval(), seed=3)
    # diffusers keeps two copies of the shared query projection and its norm: make them equal, as in a real release.
    with torch.no_grad():
        for layer in peer.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            if layer.attn1.norm_q is not None:
                layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())
    peer.save_pretrained(folder)
    return folder, peer


@pytest.fixture(scope="module")
def peer_folder(tmp_path_factory):
    return make_peer(tmp_path_factory.mktemp("peer"))


CASES = {
    "square": ([(16, 16), (16, 16)], [7, 7]),
    "non_square": ([(12, 20), (12, 20)], [7, 7]),
    "padded_captions": ([(16, 16), (16, 16)], [7, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(peer_folder, case):
    folder, peer = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).eval()
    sizes, valid = CASES[case]
    h, w = sizes[0]
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.8])
    feats, mask = caption_batch(2, 7, SMALL["cross_attention_dim"], valid)
    with torch.no_grad():
        expected = diffusers_forward(peer, x, t, feats, mask)
        got = ours(x, t, feats, mask)
    assert rel_err(got, expected) <= TOL


def test_list_batch_of_two_sizes_matches_diffusers_per_sample(peer_folder):
    folder, peer = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).eval()
    gen = torch.Generator().manual_seed(7)
    images = [torch.randn(4, 16, 16, generator=gen), torch.randn(4, 8, 12, generator=gen)]
    t = torch.tensor([0.25, 0.6])
    feats, mask = caption_batch(2, 7, SMALL["cross_attention_dim"], [7, 4])
    with torch.no_grad():
        got = ours(images, t, feats, mask)
        for b, img in enumerate(images):
            expected = diffusers_forward(peer, img[None], t[b : b + 1], feats[b : b + 1], mask[b : b + 1])[0]
            assert got[b].shape == img.shape
            assert rel_err(got[b], expected) <= TOL


# Architecture variants beside SMALL's GQA + QK-norm + learn_sigma: the diffusers config overrides, and the same
# variant as our config spells it. (diffusers 0.42.1 cannot build num_kv_heads=None with qk_norm, so its MHA names the
# head count; ours is n_kv_heads=None.)
VARIANTS = {
    "mha": ({"num_kv_heads": SMALL["num_attention_heads"]}, {"n_kv_heads": None}),
    "no_qk_norm": ({"qk_norm": False}, {"qk_norm": False}),
    "no_learn_sigma": ({"learn_sigma": False}, {"learn_sigma": False}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_peer(request, tmp_path_factory):
    diffusers_overrides, our_fields = VARIANTS[request.param]
    folder, peer = make_peer(tmp_path_factory.mktemp(request.param), **diffusers_overrides)
    return folder, peer, our_fields


def test_architecture_variant_matches_diffusers(variant_peer, tmp_path):
    folder, peer, our_fields = variant_peer
    loaded = NextDiT.from_pretrained(str(folder)).eval()
    # Our own spelling of the variant holds exactly the same tensors (strict load: a variant the config mapping dropped
    # would leave norms, kv widths or σ channels that do not fit) and computes the same thing.
    ours = NextDiT(loaded.config.replace(**our_fields)).eval()
    ours.load_state_dict(loaded.state_dict())
    for field in ("kv_heads", "qk_norm", "out_channels"):
        assert getattr(ours.config, field) == getattr(loaded.config, field), field
    x = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.8])
    feats, mask = caption_batch(2, 7, SMALL["cross_attention_dim"], [7, 3])
    # and our diffusers export of it loads in diffusers (MHA: num_kv_heads must be written as a number)
    ours.save_pretrained(str(tmp_path / "d"), fmt="diffusers")
    exported = LuminaNextDiT2DModel.from_pretrained(str(tmp_path / "d")).eval()
    with torch.no_grad():
        expected = diffusers_forward(peer, x, t, feats, mask)
        got = ours(x, t, feats, mask)
        assert torch.equal(got, loaded(x, t, feats, mask))
        assert rel_err(diffusers_forward(exported, x, t, feats, mask), expected) <= TOL
    assert got.shape == x.shape
    assert rel_err(got, expected) <= TOL


# RoPE beyond the training size. Our modes as diffusers' two knobs (ω_k = θ^(−2k/d), d = real channels of one axis):
# pi(s) is ω/s = linear_factor s; ntk(s) uses base θ·s^(d/(d−2)), and diffusers' ntk_factor multiplies θ, so
# ntk_factor = s^(d/(d−2)); official_switch(s) is linear_factor s before the watershed and ntk_factor s from it on.
def diffusers_rope_factors(mode: str, s: float, t: float, axis_dim: int) -> dict[str, float]:
    if mode == "pi":
        return {"linear_factor": s}
    if mode == "ntk":
        return {"ntk_factor": s ** (axis_dim / (axis_dim - 2))}
    if mode == "official_switch":
        return {"linear_factor": s} if t < OFFICIAL_SWITCH_WATERSHED else {"ntk_factor": s}
    raise ValueError(mode)


def wrong_rope_factors(mode: str, s: float, t: float, axis_dim: int) -> dict[str, float]:
    """Plausible mis-mappings, to show the comparisons can tell: NTK's exponent forgotten, the switch's branches
    swapped, PI read as NTK."""
    if mode == "official_switch":
        return {"ntk_factor": s} if t < OFFICIAL_SWITCH_WATERSHED else {"linear_factor": s}
    return {"ntk_factor": s}


ROPE_CASES = [("pi", 0.5), ("ntk", 0.5), ("official_switch", 0.1), ("official_switch", 0.25),
              ("official_switch", 0.35), ("official_switch", 0.9)]
TABLE_ATOL = 1e-5  # |e^{iφ} − e^{iφ'}| for angles up to ~40 rad computed in fp32 by both sides


@pytest.mark.parametrize("head_dim", [16, 72])
@pytest.mark.parametrize("s", [1.5, 4.0])
@pytest.mark.parametrize("mode,t", ROPE_CASES)
def test_scaled_rope_table_matches_diffusers(mode, t, s, head_dim):
    grid = (1, 24, 40)
    rope = NDRotaryEmbedding(head_dim, (0, head_dim // 2, head_dim // 2))
    angles = rope.angles(grid, t, RopeScaling(mode=mode, factors=(1.0, s, s)))
    ours = torch.polar(torch.ones_like(angles), angles)  # (H·W, hd/2), pairs h0, w0, h1, w1, …
    axis_dim = head_dim // 2

    def theirs(factors):  # (H, W, hd/2) in the same interleaved pair order → row-major tokens
        return get_2d_rotary_pos_embed_lumina(head_dim, grid[1], grid[2], **factors).flatten(0, 1)

    assert (ours - theirs(diffusers_rope_factors(mode, s, t, axis_dim))).abs().max() <= TABLE_ATOL
    assert (ours - theirs(wrong_rope_factors(mode, s, t, axis_dim))).abs().max() > 1e-2
    assert (ours - theirs({})).abs().max() > 1e-2  # and the scaling really changed the table


# Whole model at 2× the training grid per side (16×16 tokens for SMALL's 8×8): each sample against diffusers with the
# table its t calls for. official_switch takes the official factor from the area policy, sqrt(4) = 2; the others pin
# their factor explicitly.
FORWARD_CASES = {
    "pi": (RopeScaling(mode="pi", factors=(1.0, 2.0, 2.0)), [0.3, 0.8]),
    "ntk": (RopeScaling(mode="ntk", factors=(1.0, 3.0, 3.0)), [0.3, 0.8]),
    "official_switch_area": (RopeScaling(mode="official_switch", policy="area"), [0.1, 0.8]),
    "official_switch_area_near_watershed": (RopeScaling(mode="official_switch", policy="area"), [0.25, 0.35]),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_scaled_rope_forward_matches_diffusers(peer_folder, case):
    folder, peer = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).eval()
    scaling, times = FORWARD_CASES[case]
    grid = (1, 16, 16)
    s = ours.rope.scale_factors(grid, scaling)[1]
    assert ours.rope.scale_factors(grid, scaling) == (1.0, s, s) and s > 1
    if scaling.factors is None:
        assert s == pytest.approx(2.0)  # the official area factor at 4× the training area
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor(times)
    feats, mask = caption_batch(2, 7, SMALL["cross_attention_dim"], [7, 4])
    axis_dim = ours.config.head_dim // 2
    tables = ours.rope_tables([grid, grid], t, scaling, grid[1] * grid[2], None)  # what the blocks get, per sample
    with torch.no_grad():
        got = ours(x, t, feats, mask, rope_scaling=scaling)
        for b, t_b in enumerate(t.tolist()):
            factors = diffusers_rope_factors(scaling.mode, s, t_b, axis_dim)
            table = get_2d_rotary_pos_embed_lumina(ours.config.head_dim, grid[1], grid[2], **factors).flatten(0, 1)
            assert (tables[b] - table).abs().max() <= TABLE_ATOL
            sample = (x[b : b + 1], t[b : b + 1], feats[b : b + 1], mask[b : b + 1])
            expected = diffusers_forward(peer, *sample, **factors)
            wrong = diffusers_forward(peer, *sample, **wrong_rope_factors(scaling.mode, s, t_b, axis_dim))
            assert rel_err(got[b : b + 1], expected) <= TOL
            assert rel_err(got[b : b + 1], wrong) > 100 * TOL


def test_default_training_forward_matches_diffusers_training_forward(peer_folder):
    """jobs.train's model call (train.proportional_attn off by default, as the official recipe) equals the peer called
    without a proportional-attention base — its training-time forward — below the base token count, where the
    sampling-time scale differs (12×20 latents: 60 tokens < 64)."""
    from jobs.training.config import TrainJobConfig
    from jobs.training.loop import training_forward

    folder, peer = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).train()
    peer.train()
    x = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.2, 0.7])
    feats, mask = caption_batch(2, 7, SMALL["cross_attention_dim"], [7, 4])
    rope = get_2d_rotary_pos_embed_lumina(SMALL["hidden_size"] // SMALL["num_attention_heads"], 384, 384)
    try:
        with torch.no_grad():
            expected = peer(x, t, feats, mask, rope, cross_attention_kwargs={}, return_dict=False)[0][:, :4]
            step = training_forward(ours, torch.float32, TrainJobConfig().train.proportional_attn)
            got = step(x, t, feats, mask)
            sampling = ours(x, t, feats, mask)  # the config's sampling-time switch: proportional
    finally:
        peer.eval()
    assert rel_err(got, expected) < TOL
    assert rel_err(sampling, expected) > 100 * TOL


def _inputs(cfg: NextDiTConfig):
    x = torch.randn(2, cfg.in_channels, 12, 16, generator=torch.Generator().manual_seed(9))
    feats, mask = caption_batch(2, 5, cfg.cap_feat_dim, [5, 2])
    return x, torch.tensor([0.1, 0.9]), feats, mask


def test_round_trip_through_official_layout(peer_folder, tmp_path):
    folder, _ = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).eval()
    ours.save_pretrained(str(tmp_path / "ours"), fmt="official")
    again = NextDiT.from_pretrained(str(tmp_path / "ours")).eval()
    assert again.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    x, t, feats, mask = _inputs(ours.config)
    with torch.no_grad():
        assert torch.equal(ours(x, t, feats, mask), again(x, t, feats, mask))


def test_ours_to_diffusers_layout_loads_in_diffusers(peer_folder, tmp_path):
    folder, _ = peer_folder
    ours = NextDiT.from_pretrained(str(folder)).eval()
    ours.save_pretrained(str(tmp_path / "d"), fmt="diffusers")
    reloaded = LuminaNextDiT2DModel.from_pretrained(str(tmp_path / "d")).eval()
    x, t, feats, mask = _inputs(ours.config)
    with torch.no_grad():
        assert rel_err(ours(x, t, feats, mask), diffusers_forward(reloaded, x, t, feats, mask)) <= TOL


def test_official_pth_with_model_args_is_read_weights_only(peer_folder, tmp_path):
    """A raw official training checkpoint: consolidated .pth + a pickled argparse Namespace (no lumina_ray_config)."""
    folder, _ = peer_folder
    ours = NextDiT.from_pretrained(str(folder))
    torch.save(ours.state_dict(), tmp_path / "consolidated.00-of-01.pth")
    torch.save(argparse.Namespace(model="NextDiT_2B_GQA_patch2", qk_norm=True, image_size=128),
               tmp_path / "model_args.pth")
    cfg, _, _ = read_checkpoint(tmp_path)
    assert cfg == ours.config
    # the architecture alone, from the stored shapes without reading the tensors: memory-mapped .pth, safetensors header
    assert read_config(str(tmp_path)) == ours.config
    (tmp_path / "st").mkdir()
    save_file(ours.state_dict(), tmp_path / "st" / "consolidated.00-of-01.safetensors")
    (tmp_path / "st" / "model_args.pth").write_bytes((tmp_path / "model_args.pth").read_bytes())
    assert read_config(str(tmp_path / "st")) == ours.config
    # and a pickle that would execute code is refused
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "evil.pth")


def test_mismatched_checkpoint_names_the_keys(peer_folder, tmp_path):
    folder, _ = peer_folder
    cfg, state, _ = read_checkpoint(folder)
    del state["layers.1.attention.wq.weight"]
    state["layers.0.extra.weight"] = torch.zeros(1)
    write_checkpoint(cfg, state, tmp_path / "broken")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.attention\.wq\.weight.*unexpected keys: "
                                              r"layers\.0\.extra\.weight"):
        NextDiT.from_pretrained(str(tmp_path / "broken"))
