"""Parity with the published implementation (diffusers' LuminaNextDiT2DModel) and checkpoint round trips."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from models import NextDiT, NextDiTConfig
from models.checkpoint import CheckpointError, read_checkpoint, read_config, write_checkpoint
from tests.helpers import caption_batch, randomise

diffusers = pytest.importorskip("diffusers")
from diffusers import LuminaNextDiT2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: E402

SMALL = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_attention_heads=4,
             num_kv_heads=2, multiple_of=16, cross_attention_dim=24, learn_sigma=True, qk_norm=True)
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def diffusers_forward(peer, x, t, feats, mask):
    """The peer as its pipeline calls it: RoPE table of 384² positions, proportional attention base (size/16)²."""
    head_dim = peer.config.hidden_size // peer.config.num_attention_heads
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384)
    base = (peer.config.sample_size // peer.config.patch_size) ** 2
    out = peer(x, t, feats, mask, rope, cross_attention_kwargs={"base_sequence_length": base}, return_dict=False)[0]
    return out[:, : peer.config.in_channels]


@pytest.fixture(scope="module")
def peer_folder(tmp_path_factory):
    torch.manual_seed(0)
    peer = randomise(LuminaNextDiT2DModel(**SMALL).eval(), seed=3)
    # diffusers keeps two copies of the shared query projection and its norm: make them equal, as in a real release.
    with torch.no_grad():
        for layer in peer.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())
    folder = tmp_path_factory.mktemp("peer")
    peer.save_pretrained(folder)
    return folder, peer


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


def _inputs(cfg: NextDiTConfig):
    x = torch.randn(2, cfg.in_channels, 12, 16, generator=torch.Generator().manual_seed(9))
    feats, mask = caption_batch(2, 5, cfg.cap_feat_dim, [5, 2])
    return x, torch.tensor([0.1, 0.9]), feats, mask


def test_round_trip_through_official_layout(peer_folder, tmp_path):
    folder, peer = peer_folder
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
    folder, peer = peer_folder
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
    cfg, state, _ = read_checkpoint(tmp_path)
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
