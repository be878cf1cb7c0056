"""Next-DiT on point clouds (paper §5.3): points as tokens with no RoPE, Time-Aware Scaled Fourier Features, label or
text conditioning, any density from a model trained on 256 points
(docs/design-decisions.md#time-aware-scaled-fourier-features)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from models import NextDiT, preset
from models.config_io import ConfigError
from models.points import fourier_frequencies, scaled_frequencies
from models.rope import RopeScaling
from models.tiny import random_nextdit

TIME_AWARE = RopeScaling(mode="time_aware")


@pytest.fixture(scope="module")
def model():
    return random_nextdit(preset("tiny-points"))


def captions(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 32, generator=gen), torch.ones(batch, 6, dtype=torch.bool)


def test_a_cloud_is_a_set_the_velocity_is_per_point_and_permutes_with_it(model):
    x = torch.randn(2, 3, 1, 256, generator=torch.Generator().manual_seed(1))
    feats, mask = captions(2)
    out = model(x, torch.tensor([0.2, 0.7]), feats, mask, rope_scaling=TIME_AWARE)
    assert out.shape == x.shape and torch.isfinite(out).all()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    permuted = model(x[..., perm], torch.tensor([0.2, 0.7]), feats, mask, rope_scaling=TIME_AWARE)
    torch.testing.assert_close(permuted, out[..., perm], atol=1e-5, rtol=1e-4)  # no positions: equivariant


def test_list_batches_of_different_densities_give_each_cloud_what_it_gets_alone(model):
    clouds = [torch.randn(3, 1, n, generator=torch.Generator().manual_seed(n)) for n in (256, 1024, 300)]
    t = torch.tensor([0.1, 0.5, 0.9])
    feats, mask = captions(3)
    batched = model(clouds, t, feats, mask, rope_scaling=TIME_AWARE)
    for i, cloud in enumerate(clouds):
        alone = model([cloud], t[i: i + 1], feats[i: i + 1], mask[i: i + 1], rope_scaling=TIME_AWARE)[0]
        assert batched[i].shape == cloud.shape
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)


def test_label_conditioning():
    model = random_nextdit(preset("tiny-points").replace(conditioning="class"))
    x = torch.randn(2, 3, 1, 256, generator=torch.Generator().manual_seed(3))
    a = model(x, 0.5, labels=torch.tensor([0, 1]))
    b = model(x, 0.5, labels=torch.tensor([2, 3]))  # 3 = num_classes: the null class of CFG
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_time_aware_scaled_fourier_frequencies():
    freqs = fourier_frequencies(16, 32.0)
    assert freqs[0] == 1 and math.isclose(float(freqs[-1]), 32.0, rel_tol=1e-6)
    assert bool((freqs[1:] > freqs[:-1]).all())  # log-spaced ladder
    t = torch.tensor([0.0, 0.5, 1.0])
    # at the trained density, with fewer points, and at t = 1 (data), nothing changes
    assert torch.equal(scaled_frequencies(freqs, 256, 256, t), freqs.expand(3, -1))
    assert torch.equal(scaled_frequencies(freqs, 128, 256, t), freqs.expand(3, -1))
    dense = scaled_frequencies(freqs, 1024, 256, t)  # 4× the points: neighbours √4 = 2× closer
    torch.testing.assert_close(dense[2], freqs)
    assert torch.allclose(dense[:, 0], freqs[0].expand(3))  # the global (lowest) frequency always stays
    torch.testing.assert_close(dense[0, -1], freqs[-1] / 2)  # t = 0: the highest divided by √s
    torch.testing.assert_close(dense[1, -1], freqs[-1] / math.sqrt(2))  # half-way in t: half the exponent
    assert bool((dense[0] <= dense[1]).all()) and bool((dense[1] <= dense[2]).all())  # global early, detail late
    # ntk: the t = 0 scaling at every t; none: the ladder as trained
    assert torch.allclose(scaled_frequencies(freqs, 1024, 256, t, "ntk"), dense[0].expand(3, -1))
    assert torch.equal(scaled_frequencies(freqs, 1024, 256, t, "none"), freqs.expand(3, -1))
    with pytest.raises(ValueError, match="rule for grids"):
        scaled_frequencies(freqs, 1024, 256, t, "pi")


def test_the_scaling_changes_only_denser_clouds(model):
    feats, mask = captions(1)
    trained = torch.randn(1, 3, 1, 256, generator=torch.Generator().manual_seed(4))
    same = [model(trained, 0.0, feats, mask, rope_scaling=RopeScaling(mode=m)) for m in ("none", "time_aware")]
    torch.testing.assert_close(same[0], same[1])  # at the trained density every mode is the identity
    dense = torch.randn(1, 3, 1, 2048, generator=torch.Generator().manual_seed(5))
    early = [model(dense, 0.0, feats, mask, rope_scaling=RopeScaling(mode=m)) for m in ("none", "time_aware")]
    late = [model(dense, 1.0, feats, mask, rope_scaling=RopeScaling(mode=m)) for m in ("none", "time_aware")]
    assert not torch.allclose(early[0], early[1])
    torch.testing.assert_close(late[0], late[1])  # t = 1: the features of the trained ladder


def test_points_configs_and_inputs_are_checked(model):
    with pytest.raises(ConfigError, match="no RoPE"):
        preset("tiny-points").replace(rope_axes_dims=(0, 0, 16))
    with pytest.raises(ConfigError, match="in_channels 3"):
        preset("tiny-points").replace(in_channels=4)
    feats, mask = captions(1)
    with pytest.raises(ValueError, match="3 coordinates"):
        model.x_embedder(torch.zeros(1, 8, 4), torch.zeros(1))
    from models.nextdit import ContextDrop

    with pytest.raises(ValueError, match="no grid"):
        model(torch.zeros(1, 3, 1, 256), 0.5, feats, mask, context_drop=ContextDrop(0, 2))
    big = NextDiT(preset("points"))
    assert big.config.rope_sides[2] == 256 and big.x_embedder.trained_points == 256
    assert sum(p.numel() for p in big.parameters()) > 100e6


# ---- the Sampler: any density from a model trained on 256 points ----------------------------------------------------
@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    from models.sampler import Sampler
    from models.tiny import make_tiny_model_folder, make_tiny_text_encoder

    root = tmp_path_factory.mktemp("points-sampler")
    folder = make_tiny_model_folder(root / "points", make_tiny_text_encoder(root / "te"), preset_name="tiny-points",
                                    sampler={"steps": 2, "solver": "euler"})
    return Sampler.from_pretrained(folder, config={"batch_size": 2, "max_points": 4096})


def test_the_sampler_generates_clouds_of_any_density_deterministic_per_seed(sampler):
    from models.sampler import GenerationRequest

    default, dense = sampler.generate([GenerationRequest("a chair", seed=1),
                                       GenerationRequest("a chair", seed=1, points=2048)])
    assert default.points.shape == (256, 3) and dense.points.shape == (2048, 3)  # the training density by default
    assert default.points.dtype == np.float32 and np.isfinite(dense.points).all()
    assert dense.metadata["points"] == 2048 and "width" not in dense.metadata and default.image is None
    again = sampler.generate([GenerationRequest("a chair", seed=1, points=2048)])[0]
    assert np.array_equal(again.points, dense.points)
    other = sampler.generate([GenerationRequest("a chair", seed=2, points=2048)])[0]
    assert not np.array_equal(other.points, dense.points)


@pytest.mark.parametrize("bad,match", [
    ({"points": 0}, "whole number ≥ 1"),
    ({"points": 5000}, "exceeds the maximum of 4096"),
    ({"width": 64, "height": 64}, "takes a point count, not a size"),
    ({"duration": 1.0}, "takes a point count"),
])
def test_bad_point_requests_fail_before_work(sampler, bad, match):
    from models.sampler import GenerationRequest

    with pytest.raises(ValueError, match=match):
        sampler.generate([GenerationRequest("x", **bad)])


def test_a_point_count_for_an_image_model_and_a_vae_for_a_points_model_are_errors(sampler, tmp_path):
    from models.sampler import GenerationRequest, Sampler
    from models.tiny import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    te = make_tiny_text_encoder(tmp_path / "te")
    image = Sampler.from_pretrained(make_tiny_model_folder(tmp_path / "image", te, make_tiny_vae(tmp_path / "vae")))
    with pytest.raises(ValueError, match="an image model takes no point count"):
        image.generate([GenerationRequest("x", points=256)])
    with pytest.raises(ValueError, match="takes no VAE"):
        Sampler(sampler.model, sampler.text_encoder, image.vae)


def test_a_saved_points_model_loads_with_its_fourier_ladder(model, tmp_path):
    x = torch.randn(1, 3, 1, 512, generator=torch.Generator().manual_seed(6))
    feats, mask = captions(1)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = NextDiT.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(x, 0.3, feats, mask, rope_scaling=TIME_AWARE),
                               model(x, 0.3, feats, mask, rope_scaling=TIME_AWARE))


def test_the_generate_job_writes_ply_npy_and_rendered_views(sampler, tmp_path):
    import json

    import trimesh
    from PIL import Image

    from jobs.generate import main as generate
    from models.tiny import make_tiny_model_folder, make_tiny_text_encoder

    folder = make_tiny_model_folder(tmp_path / "points", make_tiny_text_encoder(tmp_path / "te"),
                                    preset_name="tiny-points", sampler={"steps": 2, "solver": "euler"})
    argv = ["--model", folder, "--prompt", "a chair", "--points", "2048", "--seed", "3"]
    assert generate(argv + ["--out", str(tmp_path / "out")]) == 0
    cloud = np.load(tmp_path / "out" / "000000_3.npy")
    assert cloud.shape == (2048, 3) and cloud.dtype == np.float32
    ply = trimesh.load(tmp_path / "out" / "000000_3.ply")
    np.testing.assert_array_equal(np.asarray(ply.vertices, dtype=np.float32), cloud)
    assert Image.open(tmp_path / "out" / "000000_3.png").size == (256, 256)  # 4 views of 128²
    assert json.loads((tmp_path / "out" / "000000_3.json").read_text())["points"] == 2048
    assert generate(argv + ["--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "000000_3.ply").read_bytes() == (tmp_path / "out" / "000000_3.ply").read_bytes()
    from models.config_io import ConfigError

    with pytest.raises(ConfigError, match="give one of --size"):
        generate(argv + ["--duration", "1", "--out", str(tmp_path / "x")])


# ---- metrics (paper §5.3, Table 7) ---------------------------------------------------------------------------------
def clouds(count: int, points: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, points, 3, generator=gen) * 2 - 1


def test_chamfer_distance_on_known_cases():
    from models.point_metrics import chamfer, chamfer_matrix

    a, b = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]]), torch.tensor([[[0.0, 0, 0]]])
    assert float(chamfer(a, b)[0]) == pytest.approx(0.5)  # (0 + 1) / 2 one way, 0 the other
    assert float(chamfer(b, b + torch.tensor([3.0, 4, 0]))[0]) == pytest.approx(50.0)  # 2 · 5²: squared, both ways
    x = clouds(3)
    d = chamfer_matrix(x, x)
    assert torch.allclose(d.diagonal(), torch.zeros(3)) and torch.allclose(d, d.T) and bool((d + torch.eye(3) > 0).all())
    torch.testing.assert_close(chamfer_matrix(x, clouds(5, 32, 1), batch=2), chamfer_matrix(x, clouds(5, 32, 1)))
    # the CPU's KD-tree nearest neighbours (the default there) give what all N × M distances give (an accelerator's)
    y = clouds(3, 48, 4)
    full = torch.cdist(x.double(), y.double()).pow(2)
    expected = (full.min(2).values.mean(1) + full.min(1).values.mean(1)).float()
    torch.testing.assert_close(chamfer(x, y), expected)
    torch.testing.assert_close(chamfer(x, y, backend="matrix"), expected)
    assert float(chamfer(x[:1], x[:1], backend="matrix")[0]) == 0 == float(chamfer(x[:1], x[:1])[0])


def test_mmd_cov_and_1nna_on_known_cases():
    from models.point_metrics import mmd_cov, one_nna, point_metrics

    reference = clouds(6, seed=2)
    same = point_metrics(reference, reference.clone())
    assert same["mmd_cd"] == 0 and same["cov_cd"] == 1
    assert same["1nna_cd"] == 0  # every cloud's nearest neighbour is its twin in the other set: always wrong
    far = reference + torch.tensor([10.0, 0, 0])
    shifted = point_metrics(far, reference)
    assert shifted["mmd_cd"] > 2 * 8**2 and shifted["1nna_cd"] == 1  # fully separable
    collapsed = reference[:1].expand(6, -1, -1)  # one mode for every sample
    assert mmd_cov(collapsed, reference)["cov_cd"] == pytest.approx(1 / 6)
    denser = torch.cat([reference, reference], dim=1)  # the same clouds at twice the density: same shapes
    assert mmd_cov(denser, reference)["mmd_cd"] == 0 and one_nna(denser, reference) == 0


def test_a_label_conditioned_cloud_model_takes_a_class_name_or_index(tmp_path):
    from models.sampler import GenerationRequest, Sampler
    from models.tiny import make_tiny_model_folder, random_nextdit

    model = random_nextdit(preset("tiny-points").replace(conditioning="class"))
    folder = make_tiny_model_folder(tmp_path / "labels", model=model, class_names=["sphere", "cube", "cylinder"],
                                    sampler={"steps": 2, "solver": "euler"})
    sampler = Sampler.from_pretrained(folder)
    by_name, by_index, other = sampler.generate([GenerationRequest("cube", seed=2, points=512),
                                                 GenerationRequest("1", seed=2, points=512),
                                                 GenerationRequest("sphere", seed=2, points=512)])
    assert by_name.points.shape == (512, 3) and by_name.metadata["class_label"] == 1
    assert np.array_equal(by_name.points, by_index.points) and not np.array_equal(by_name.points, other.points)


def test_ply_bytes_round_trip_and_bad_files():
    import trimesh

    from models.points import ply_bytes, read_ply

    cloud = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    data = ply_bytes(cloud)
    np.testing.assert_array_equal(read_ply(data), cloud)
    np.testing.assert_array_equal(np.asarray(trimesh.load(io.BytesIO(data), file_type="ply").vertices, np.float32),
                                  cloud)  # what other tools read
    for bad, match in ((b"PK\x03\x04", "not a PLY file"), (data[:-4], "holds 3596 bytes; 300 vertices need 3600"),
                       (data.replace(b"binary_little_endian", b"binary_big_endian"), "little-endian")):
        with pytest.raises(ValueError, match=match):
            read_ply(bad)
