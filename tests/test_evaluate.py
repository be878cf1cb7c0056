"""Evaluation metrics (models.image_metrics, models.image_features, models.audio_metrics) and ``jobs.evaluate``.

Properties, not fixed numbers: the Fréchet distance of a set to itself is 0 and grows with a real shift (noise, blur),
the same inputs give the same numbers, IS is 1 for a classifier that cannot tell anything apart and K for one that
spreads K classes evenly and surely, the CLIP score ranks matching pairs above shuffled ones where the features make
that true by construction. The formulas agree with scipy's sqrtm form and with torchmetrics on the same features.
Every network is a tiny random one made here (models/tiny.py); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from jobs import evaluate as job
from models import image_metrics as M
from models.audio_metrics import AudioClassifier, ClapScorer, kl_divergence
from models.image_features import ClipScorer, InceptionFeatures, _inception_state, load_image_features
from models.tiny import make_tiny_audio_classifier, make_tiny_clap_model, make_tiny_clip, make_tiny_dinov2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("extractors")
    return {"dino": make_tiny_dinov2(root / "dino"), "clip": make_tiny_clip(root / "clip"),
            "clap": make_tiny_clap_model(root / "clap"), "ast": make_tiny_audio_classifier(root / "ast")}


def pictures(n: int, seed: int = 0, side: int = 32) -> list[np.ndarray]:
    """Smooth colour fields, each with a disc: images with structure for the features to see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, (3, 3))
        image = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * yy for k in range(3)], -1)
        image /= image.max()
        r, (cx, cy) = rng.integers(side // 8, side // 3), rng.integers(side // 4, 3 * side // 4, 2)
        image[((xx * (side - 1) - cx) ** 2 + (yy * (side - 1) - cy) ** 2) < r * r] = rng.uniform(0, 1, 3)
        out.append((image * 255).astype(np.uint8))
    return out


def batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------------------------- the formulas


def random_stats(d: int, n: int, seed: int, shift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    return x + shift


def test_frechet_distance_matches_scipy_sqrtm_and_torchmetrics():
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = random_stats(12, 200, 0), random_stats(12, 150, 1, shift=0.5)
    a, b = M.feature_stats(x), M.feature_stats(y)
    assert np.allclose(a.mu, x.mean(0).numpy()) and np.allclose(a.sigma, np.cov(x.numpy(), rowvar=False))
    ours = a.frechet_distance(b)
    # the ADM suite's / pytorch-fid's form: sqrtm of the non-symmetric product
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    scipy_fd = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert ours == pytest.approx(scipy_fd, rel=1e-6)

    class Identity(torch.nn.Module):  # torchmetrics' custom feature network: features in, features out
        num_features = 12

        def forward(self, z):
            return z

    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(x, real=True)
    fid.update(y, real=False)
    assert ours == pytest.approx(float(fid.compute()), rel=1e-5)


def test_accumulating_in_batches_gives_the_statistics_of_the_whole():
    x = random_stats(8, 301, 2, shift=1e3)  # a large mean: the naive Σxxᵀ − nμμᵀ would lose digits here
    acc = M.StatsAccumulator()
    for part in torch.split(x, 37):
        acc.update(part)
    whole = acc.stats()
    assert whole.n == 301 and whole.features.shape == (301, 8)
    assert np.allclose(whole.mu, x.mean(0).numpy(), rtol=1e-12)
    assert np.allclose(whole.sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_and_separates_shifted_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = random_stats(16, 60, 3).float(), random_stats(16, 60, 4, shift=0.3).float()

    class Identity(torch.nn.Module):
        num_features = 16

        def forward(self, z):
            return z

    # one subset of every sample: the subset's order is all the randomness, and MMD² does not depend on it
    kid = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=60)
    kid.update(x, real=True)
    kid.update(y, real=False)
    ours, _ = M.kernel_inception_distance(x, y, subsets=1, subset_size=60)
    assert ours == pytest.approx(float(kid.compute()[0]), rel=1e-4)
    same = M.kernel_inception_distance(x[:30], random_stats(16, 60, 3)[30:], subsets=20, subset_size=20)
    shifted = M.kernel_inception_distance(x, random_stats(16, 60, 3, shift=2.0), subsets=20, subset_size=20)
    assert shifted[0] > same[0] + 3 * same[1]
    assert M.kernel_inception_distance(x, y, subsets=5, subset_size=20) == \
        M.kernel_inception_distance(x, y, subsets=5, subset_size=20)  # seeded: deterministic


def test_inception_score_bounds_by_construction():
    k, n = 5, 50
    assert M.inception_score(torch.zeros(n, k), splits=5)[0] == pytest.approx(1.0)  # nothing told apart
    sure = torch.full((n, k), -1e4)
    sure[torch.arange(n), torch.arange(n) % k] = 0  # every class equally often, each prediction certain
    mean, std = M.inception_score(sure, splits=5)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)


def test_precision_and_recall_by_construction():
    """Identical sets cover each other; a set collapsed onto a few real points is precise but covers almost nothing;
    a set far away is neither. Chunks smaller than the sets give the same numbers as one chunk."""
    real = random_stats(16, 200, 5)
    assert M.precision_recall(real, real) == (1.0, 1.0)
    collapsed = real[:4].repeat(50, 1) + 1e-6 * random_stats(16, 200, 6)  # 4 real points, 50 near-copies each
    precision, recall = M.precision_recall(real, collapsed, chunk=64)
    assert precision == 1.0 and recall == pytest.approx(4 / 200)
    assert (precision, recall) == M.precision_recall(real, collapsed, chunk=1000)  # chunking changes nothing
    assert M.precision_recall(real, real + 1e3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        M.precision_recall(real, real[:3])


def test_clip_score_ranks_matching_pairs_above_shuffled_ones():
    """A feature model where matching holds by construction: an image's embedding is its mean colour, a prompt's the
    colour it names."""
    names = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
    prompts = ["red", "green", "blue", "green", "red", "blue"]
    images = torch.stack([torch.tensor(names[p]).view(3, 1, 1).expand(3, 8, 8) * 0.8 + 0.1 for p in prompts])
    image_embeds = images.mean((2, 3))
    text = torch.tensor([names[p] for p in prompts])
    matching = M.clip_score(image_embeds, text)
    shuffled = M.clip_score(image_embeds, text.roll(1, 0))
    assert matching.mean() > shuffled.mean() and bool((matching > shuffled).all())
    assert float(matching.max()) <= 100


def test_kl_of_paired_predictions():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for mode in ("softmax", "sigmoid"):
        assert kl_divergence(logits, logits, mode) == pytest.approx(0.0, abs=1e-12)
        assert kl_divergence(logits, logits.flip(1), mode) > 0
    with pytest.raises(ValueError, match="paired"):
        kl_divergence(logits, logits[:3])


# ---------------------------------------------------------------------------------------------------------- extractors


def test_frechet_distance_of_features_is_zero_to_itself_and_grows_with_noise_and_blur(tiny):
    extractor = load_image_features(tiny["dino"])
    images = pictures(48)
    ref = M.feature_stats(extractor(batch(images))["features"])
    assert ref.frechet_distance(M.feature_stats(extractor(batch(images))["features"])) == pytest.approx(0, abs=1e-9)
    noise = [ref.frechet_distance(M.feature_stats(extractor(batch([
        np.clip(im + np.random.default_rng(1).normal(0, s, im.shape), 0, 255).astype(np.uint8) for im in images]))
        ["features"])) for s in (4, 16, 64)]
    blur = [ref.frechet_distance(M.feature_stats(extractor(batch([
        np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(r))) for im in images]))["features"]))
        for r in (0.5, 1, 3)]
    assert 0 < noise[0] < noise[1] < noise[2] and 0 < blur[0] < blur[1] < blur[2]
    again = ref.frechet_distance(M.feature_stats(extractor(batch([
        np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(3))) for im in images]))["features"]))
    assert again == blur[2]  # deterministic


def test_inception_loads_from_a_local_weights_file_without_any_download(tmp_path, monkeypatch):
    """pytorch-fid's file is torchvision's Inception-v3 layout (1008 classes, no auxiliary head): a random one of that
    layout stands in for pt_inception-2015-12-05; one without BatchNorm counters (older files) loads too."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from torchvision.models import inception_v3

    def no_download(*args, **kwargs):
        raise AssertionError("the Inception weights were to be downloaded")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    torch.save(state, tmp_path / "pt_inception-random.pth")
    extractor = load_image_features(str(tmp_path / "pt_inception-random.pth"))
    assert isinstance(extractor, InceptionFeatures) and extractor.id.startswith("inception-v3-compat:")
    out = extractor(torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8))
    assert out["features"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    old = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # DataParallel, <0.4.1
    fixed, changed = _inception_state(old, "old.pth")
    assert changed and fixed.keys() == state.keys()
    with pytest.raises(ValueError, match="not an Inception state dict"):
        _inception_state([1, 2], "other.pth")


def test_sfid_precision_and_recall_through_the_job(tmp_path):
    """sFID's spatial features (Inception's Mixed_6d.branch1x1, TF's mixed_6/conv: 7 × 17 × 17 = 2023): sFID grows
    from 0 for a set against itself with a shift; the job reports sFID, precision and recall; its cache file keeps the
    spatial statistics as ADM's mu_s / sigma_s; and with an ADM-style reference the Fréchet distance uses the file's
    statistics while precision and recall use the features of its arr_0 images. A 2023-d Fréchet distance costs a
    second on two cores: two here."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    weights = str(tmp_path / "pt_inception-random.pth")
    torch.save(state, weights)
    images = pictures(4)

    def shift(d):
        return [np.clip(im.astype(int) + d, 0, 255).astype(np.uint8) for im in images]

    real = write_images(tmp_path / "real", images)
    args = ["--metric", "sfid,precision,recall", "--feature-extractor", weights,
            "--set", f"stats_cache={tmp_path / 'cache'}"]
    assert job.main([*args, "--real", real, "--fake", write_images(tmp_path / "fake", shift(16)),
                     "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["sfid"]["value"] > 0 and metrics["sfid"]["label"] == "sFID"
    assert 0 <= metrics["precision"]["value"] <= 1 and 0 <= metrics["recall"]["value"] <= 1
    assert metrics["precision"]["k"] == 3 and metrics["recall"]["real_samples"] == 4
    cached = M.load_stats(report["real"]["cache_file"])
    assert cached.spatial.mu.shape == (2023,) and cached.pool.features.shape == (4, 2048)
    # an ADM-style reference whose statistics are the real set's but whose arr_0 holds other images: scoring the real
    # set against it gives sFID 0 only if the file's mu_s / sigma_s are used
    np.savez(tmp_path / "ref.npz", arr_0=np.stack(shift(64)), mu=cached.pool.mu, sigma=cached.pool.sigma,
             mu_s=cached.spatial.mu, sigma_s=cached.spatial.sigma)
    assert job.main([*args, "--real-stats", str(tmp_path / "ref.npz"), "--fake", real,
                     "--out", str(tmp_path / "out2")]) == 0
    adm = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert adm["metrics"]["sfid"]["value"] == pytest.approx(0, abs=1e-6 * metrics["sfid"]["value"])
    assert adm["real"]["statistics"] == "file" and adm["real"]["features"] == "computed"
    assert adm["metrics"]["recall"]["real_samples"] == 4 and adm["metrics"]["precision"]["value"] < 1


def test_transformers_extractors_and_clip_scorer_load_from_folders(tiny):
    images = batch(pictures(3, side=40))
    clip = load_image_features(tiny["clip"])
    assert clip(images)["features"].shape == (3, clip.dim) and clip.id.startswith("clip:")
    scorer = ClipScorer(tiny["clip"])
    scores = scorer(images, ["a red circle", "a blue square", "a green tree"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())
    assert torch.equal(scores, scorer(images, ["a red circle", "a blue square", "a green tree"]))


def test_audio_models_load_from_folders_and_are_deterministic(tiny):
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, 20000).astype(np.float32), np.sin(np.arange(9000) / 5).astype(np.float32)]
    clap = ClapScorer(tiny["clap"])
    first = clap(waves, 22050, ["a low tone", "a high tone"])  # resampled to the extractor's 16 kHz, long clip cut
    assert first.shape == (2,) and torch.equal(first, clap(waves, 22050, ["a low tone", "a high tone"]))
    classifier = AudioClassifier(tiny["ast"])
    assert classifier(waves, 16000).shape == (2, 8) and classifier.multi_label


# ------------------------------------------------------------------------------------------------ reference .npz files


def test_adm_reference_batches_load(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=2048), np.eye(2048)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2023], sigma_s=np.eye(2023))
    ref = M.load_stats(str(tmp_path / "VIRTUAL_ref.npz"))
    assert ref.adm and ref.images == 5 and ref.image_shape == (5, 16, 16, 3)
    assert np.array_equal(ref.pool.mu, mu) and ref.spatial.mu.shape == (2023,) and ref.pool.features is None
    streamed = np.concatenate(list(M.iter_npz_images(str(tmp_path / "VIRTUAL_ref.npz"), batch_size=2)))
    assert np.array_equal(streamed, images)
    np.savez(tmp_path / "samples.npz", images)  # a sample batch: arr_0 only
    only_images = M.load_stats(str(tmp_path / "samples.npz"))
    assert only_images.pool is None and only_images.images == 5
    np.savez(tmp_path / "nothing.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no statistics"):
        M.load_stats(str(tmp_path / "nothing.npz"))
    # our own files round-trip, features and meta included
    ours = M.feature_stats(random_stats(4, 10, 0), {"extractor": "x"})
    M.save_stats(str(tmp_path / "ours.npz"), ours)
    back = M.load_stats(str(tmp_path / "ours.npz"))
    assert not back.adm and back.pool.n == 10 and back.pool.meta == {"extractor": "x"}
    assert np.array_equal(back.pool.features, ours.features) and np.array_equal(back.pool.sigma, ours.sigma)


# ---------------------------------------------------------------------------------------------------------- the job


def write_images(folder, images, prompts=None, corrupt: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}_{i}.png")
        if prompts:  # jobs.generate's JSON sidecar
            (folder / f"{i:06d}_{i}.json").write_text(json.dumps({"prompt": prompts[i], "seed": i}))
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return str(folder)


def test_score_only_writes_the_report_counts_a_corrupt_file_and_caches_the_reference(tiny, tmp_path):
    real = write_images(tmp_path / "real", pictures(12, seed=1))
    Image.fromarray(pictures(1, seed=3)[0]).save(tmp_path / "real" / "odd [1].png")  # not a glob pattern here
    fakes = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1))) for im in pictures(10, seed=2)]
    fake = write_images(tmp_path / "fake", fakes, prompts=["a red circle"] * 10, corrupt=True)
    args = ["--real", real, "--fake", fake, "--metric", "fid,kid,clip_score", "--feature-extractor", tiny["dino"],
            "--clip-model", tiny["clip"], "--set", f"stats_cache={tmp_path / 'cache'}", "--set", "kid.subsets=10",
            "--set", "grid=4"]
    assert job.main([*args, "--out", str(tmp_path / "out1")]) == 0
    report = json.loads((tmp_path / "out1" / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["fid"]["value"] > 0 and metrics["fid"]["label"] == "FD_DINOv2"
    assert metrics["fid"]["real_samples"] == 13 and metrics["fid"]["fake_samples"] == 10
    assert metrics["kid"]["subset_size"] == 10 and metrics["clip_score"]["fake_samples"] == 10
    assert report["fake"]["samples"] == 10 and [b["file"] for b in report["fake"]["bad"]] == ["broken.png"]
    assert "broken.png" in (tmp_path / "out1" / "report.md").read_text()
    assert report["real"]["statistics"] == "computed"
    assert Image.open(tmp_path / "out1" / "grid.png").size == (2 * 128, 2 * 128)
    assert job.main([*args, "--out", str(tmp_path / "out2")]) == 0
    again = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert again["real"]["statistics"] == "cache"
    assert again["metrics"]["fid"]["value"] == metrics["fid"]["value"]
    # the cached file is a statistics file in its own right
    cached = again["real"]["cache_file"]
    assert job.main([*args[2:], "--real-stats", cached, "--out", str(tmp_path / "out3")]) == 0
    third = json.loads((tmp_path / "out3" / "report.json").read_text())
    assert third["real"]["statistics"] == "file" and third["metrics"]["fid"]["value"] == metrics["fid"]["value"]


def test_a_prepared_shard_set_is_a_real_set(tiny, tmp_path):
    """A jobs.prepare output without a VAE: its bucket-sized images; a latent-only sample has no image and is listed."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    shard = tmp_path / "prep" / "shards" / "image" / "32x32" / "000000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for i, image in enumerate(pictures(5)):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            key = f"{i:016x}"
            member(tar, f"{key}.json", json.dumps({"member": "png" if i < 4 else "latent.npy"}).encode())
            member(tar, f"{key}.{'png' if i < 4 else 'latent.npy'}", png.getvalue())
            member(tar, f"{key}.txt", b"a caption")
    pq.write_table(pa.table({"path": ["shards/image/32x32/000000.tar"], "modality": ["image"], "bucket": ["32x32"],
                             "samples": [5], "bytes": [shard.stat().st_size]}), tmp_path / "prep" / "manifest.parquet")
    fake = write_images(tmp_path / "fake", pictures(4, seed=5))
    assert job.main(["--real", str(tmp_path / "prep"), "--fake", fake, "--feature-extractor", tiny["dino"],
                     "--set", f"stats_cache={tmp_path / 'cache'}", "--out", str(tmp_path / "out")]) == 0
    real = json.loads((tmp_path / "out" / "report.json").read_text())["real"]
    assert real["samples"] == 4 and [b["file"] for b in real["bad"]] == ["shards/image/32x32/000000.tar#4"]
    assert "no original was kept" in real["bad"][0]["reason"]


def test_adm_statistics_need_the_inception_network(tiny, tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    fake = write_images(tmp_path / "fake", pictures(4))
    with pytest.raises(ValueError, match="ADM suite's Inception pool statistics"):
        job.main(["--real-stats", str(tmp_path / "ref.npz"), "--fake", fake, "--feature-extractor", tiny["dino"],
                  "--out", str(tmp_path / "out")])


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_audio_metrics_end_to_end(tiny, tmp_path):
    t = np.arange(16000) / 16000
    for side, detune in (("real", 1.0), ("fake", 1.05)):
        folder = tmp_path / side
        folder.mkdir()
        for i, f in enumerate((220, 330, 440, 660)):
            (folder / f"tone{i}.wav").write_bytes(wav_bytes(0.5 * np.sin(2 * np.pi * f * detune * t)))
            (folder / f"tone{i}.json").write_text(json.dumps({"prompt": f"a tone at {f} hz"}))
    (tmp_path / "fake" / "empty.wav").write_bytes(b"")
    assert job.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "fad,kl,clap_score", "--audio-model", tiny["clap"], "--clap-model", tiny["clap"],
                     "--classifier", tiny["ast"], "--set", f"stats_cache={tmp_path / 'cache'}",
                     "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["fad"]["label"] == "FAD" and report["metrics"]["fad"]["value"] >= 0
    assert report["metrics"]["kl"]["pairs"] == 4 and report["metrics"]["kl"]["mode"] == "sigmoid"
    assert report["metrics"]["clap_score"]["fake_samples"] == 4
    assert [b["file"] for b in report["fake"]["bad"]] == ["empty.wav"]
    # the real clips' statistics, cached by that run, are a reference file of their own: the same FAD from it alone
    cache_file = report["real"]["cache_file"]
    assert job.main(["--real-stats", cache_file, "--fake", str(tmp_path / "fake"), "--metric", "fad",
                     "--audio-model", tiny["clap"], "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["real"]["statistics"] == "file" and again["metrics"]["fad"]["value"] == pytest.approx(
        report["metrics"]["fad"]["value"], rel=1e-6)
    # statistics of another network do not compare: a clear error names both
    with pytest.raises(ValueError, match="computed with"):
        job.main(["--real-stats", cache_file, "--fake", str(tmp_path / "fake"), "--metric", "fad",
                  "--audio-model", tiny["ast"], "--out", str(tmp_path / "other")])


def test_config_errors_name_the_problem(tmp_path):
    def error(*args):
        cfg = job.EvaluateConfig(**dict(args))
        with pytest.raises(ValueError) as info:
            job.validate(cfg)
        return str(info.value)

    assert "--feature-extractor" in error(("fake", "x"), ("real", "y"))
    assert "unknown metric(s) fidd" in error(("fake", "x"), ("metrics", ["fidd"]))
    assert "compare against real data" in error(("fake", "x"), ("feature_extractor", "e"))
    assert "one job per modality" in error(("fake", "x"), ("metrics", ["fid", "fad"]))
    assert "exactly one of --prompts" in error(("model", "m"), ("real", "r"), ("feature_extractor", "e"))


def test_generation_resumes_where_it_stopped(tmp_path):
    """Generate and score plans jobs.generate's rows and leaves out the samples already written."""
    cfg = job.EvaluateConfig(model="M", classes=3, samples=2, out=str(tmp_path))
    rows = job.generation_rows(cfg)
    assert [(r["prompt"], r["seed"]) for r in rows] == [("0", 0), ("0", 1), ("1", 2), ("1", 3), ("2", 4), ("2", 5)]
    written = {"000000_0.png", "000000_0.json", "000001_1.json"}  # the second one's sidecar only: not done
    assert [r["index"] for r in job.pending(rows, written)] == [1, 2, 3, 4, 5]


def test_generate_and_score_writes_the_samples_once(tiny, tmp_path, monkeypatch):
    """--model --classes N --samples K: jobs.generate's Ray Data path (run_ray, the --prompt-file job) gets the class
    rows and writes OUT/samples (a tiny class model, 2 solver steps); a second run finds them all and only scores.
    run_ray's Ray Data job itself is tests/test_generate.py's (on the session's cluster); here its rows go through
    jobs.generate's sampler and writer in this process, which keeps this test in the quick tier."""
    from jobs import generate
    from models.tiny import make_tiny_model_folder, make_tiny_vae

    ray_calls = []

    def run_ray_here(gen, rows):
        ray_calls.append([(r["index"], r["prompt"], r["seed"]) for r in rows])
        return generate.run_local(gen, rows)

    monkeypatch.setattr(generate, "run_ray", run_ray_here)

    model = make_tiny_model_folder(tmp_path / "model", vae=make_tiny_vae(tmp_path / "vae"), preset_name="tiny-class")
    real = write_images(tmp_path / "real", pictures(4))
    args = ["--model", model, "--classes", "2", "--samples", "2", "--metric", "fid", "--feature-extractor",
            tiny["dino"], "--real", real, "--set", "generation.sampler.steps=2", "--set", "generation.size=32x32",
            "--set", f"stats_cache={tmp_path / 'cache'}", "--out", str(tmp_path / "out")]
    reports = []
    for _ in range(2):
        assert job.main(args) == 0
        reports.append(json.loads((tmp_path / "out" / "report.json").read_text()))
    assert reports[0]["mode"] == "generate" and reports[0]["fake"]["generated"]["skipped"] == 0
    assert reports[1]["fake"]["generated"]["skipped"] == 4 and reports[1]["fake"]["samples"] == 4
    assert reports[1]["metrics"]["fid"]["value"] == reports[0]["metrics"]["fid"]["value"]
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 4
    assert ray_calls == [[(0, "0", 0), (1, "0", 1), (2, "1", 2), (3, "1", 3)]]  # once: the second run skipped all


# ------------------------------------------------------------------------------------------------------- point clouds


def test_point_metrics_through_the_job(tmp_path):
    """--metric mmd_cd,cov_cd,1nna_cd (paper §5.3): a set against itself is indistinguishable (MMD 0, every reference
    covered, 1-NNA 0: each cloud's nearest neighbour is its twin in the other set); a set of one solid against a
    reference of two covers half and is told apart; clouds are read as jobs.prepare reads them (.npy, .ply, meshes),
    jobs.generate's .npy/.ply pair counts once, and an unreadable file is listed."""
    import trimesh

    from jobs.demo_data import solid_points
    from models.points import ply_bytes

    rng = np.random.default_rng(0)
    real, spheres = tmp_path / "real", tmp_path / "spheres"
    real.mkdir()
    spheres.mkdir()
    for i in range(4):
        for solid in ("cube", "sphere"):
            np.save(real / f"{solid}_{i}.npy", solid_points(solid, 600, rng) * (1 + i))  # any scale: normalised
        cloud = solid_points("sphere", 700, rng).astype(np.float32)
        np.save(spheres / f"{i:06d}_0.npy", cloud)  # jobs.generate's pair: the same cloud twice
        (spheres / f"{i:06d}_0.ply").write_bytes(ply_bytes(cloud))
    trimesh.creation.icosphere(subdivisions=2).export(spheres / "mesh.obj")  # a mesh: sampled on its surface
    (spheres / "broken.ply").write_bytes(b"ply\nnot a cloud")
    metrics = ["--metric", "mmd_cd,cov_cd,1nna_cd", "--set", "points=512"]
    assert job.main(["--real", str(real), "--fake", str(real), *metrics, "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "report.json").read_text())
    assert same["modality"] == "points" and same["fake"]["samples"] == same["real"]["samples"] == 8
    values = {name: r["value"] for name, r in same["metrics"].items()}
    assert values == {"mmd_cd": 0.0, "cov_cd": 1.0, "1nna_cd": 0.0}
    assert same["metrics"]["mmd_cd"]["points"] == {"fake": 512, "real": 512} and "MMD-CD" in (
        tmp_path / "same" / "report.md").read_text()

    assert job.main(["--real", str(real), "--fake", str(spheres), *metrics, "--out", str(tmp_path / "spheres")]) == 0
    report = json.loads((tmp_path / "spheres" / "report.json").read_text())
    assert report["fake"]["samples"] == 5  # four clouds (.npy kept, .ply left out) and the mesh
    assert [b["file"] for b in report["fake"]["bad"]] == ["broken.ply"]
    result = {name: r["value"] for name, r in report["metrics"].items()}
    assert result["cov_cd"] <= 0.5 and result["mmd_cd"] > 0 and result["1nna_cd"] >= 0.5  # no cube: told apart
    with pytest.raises(ValueError, match="compare clouds pair by pair"):
        job.validate(job.EvaluateConfig(fake="x", real_stats="s.npz", metrics=["mmd_cd"]))
    with pytest.raises(ValueError, match="image and points metrics in one run"):
        job.validate(job.EvaluateConfig(fake="x", real="y", metrics=["fid", "cov_cd"], feature_extractor="f"))


def test_a_prepared_point_shard_set_is_a_real_set(tmp_path):
    """A jobs.prepare output's point shards: each sample's points.npy, in manifest order."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.demo_data import solid_points
    from pipelines.decode import normalise_unit_sphere

    rng = np.random.default_rng(1)
    clouds = [normalise_unit_sphere(solid_points(s, 256, rng)) for s in ("cube", "sphere", "cube")]
    shard = tmp_path / "prep" / "shards" / "points" / "256pts" / "000000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for i, cloud in enumerate(clouds):
            for name, data in ((f"{i:016x}.json", json.dumps({"member": "points.npy"}).encode()),
                               (f"{i:016x}.points.npy", npy_bytes(cloud))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"path": ["shards/points/256pts/000000.tar"], "modality": ["points"],
                             "bucket": ["256pts"], "samples": [3], "bytes": [shard.stat().st_size]}),
                   tmp_path / "prep" / "manifest.parquet")
    fake = tmp_path / "fake"
    fake.mkdir()
    for i, cloud in enumerate(clouds):
        np.save(fake / f"{i}.npy", cloud)
    assert job.main(["--real", str(tmp_path / "prep"), "--fake", str(fake), "--metric", "mmd_cd,cov_cd",
                     "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["real"]["samples"] == 3 and report["metrics"]["cov_cd"]["value"] == 1.0
    assert report["metrics"]["mmd_cd"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert report["metrics"]["mmd_cd"]["points"] == {"fake": 256, "real": 256}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
