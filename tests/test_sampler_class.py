"""Class-conditional sampling: class index / name / label → image, CFG against the null class, batching, jobs.generate."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.generate import main
from models.sampler import GenerationRequest, Sampler
from tests.tiny_models import make_tiny_model_folder, make_tiny_vae

CLASSES = ["airplane", "automobile", "bird", "Tabby Cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler-class")
    vae = make_tiny_vae(root / "vae")
    # A text encoder recorded in the metadata (e.g. by an export) is ignored for a class model: this path does not exist.
    folder = make_tiny_model_folder(root / "model", text_encoder=str(root / "no-such-encoder"), vae=vae,
                                    preset_name="tiny-class", class_names=CLASSES, sampler={"steps": 2})
    bare = make_tiny_model_folder(root / "bare", vae=vae, preset_name="tiny-class")  # no class_names
    return {"folder": folder, "bare": bare, "vae": vae}


@pytest.fixture(scope="module")
def sampler(parts):
    return Sampler.from_pretrained(parts["folder"])


def req(prompt="3", **kw):
    kw.setdefault("width", 48)
    kw.setdefault("height", 32)
    kw.setdefault("seed", 1)
    return GenerationRequest(prompt, **kw)


def test_index_name_and_class_label_pick_the_same_class(sampler):
    assert sampler.text_encoder is None and sampler.class_names == CLASSES
    by_index, by_name, by_label = sampler.generate([req("3"), req(" tabby cat "), req("", class_label=3)])
    for res in (by_index, by_name, by_label):
        assert res.image.shape == (32, 48, 3) and res.image.dtype == np.uint8
        assert res.latent.shape == (4, 4, 6)
        assert res.metadata["class_label"] == 3 and res.metadata["class_name"] == "Tabby Cat"
        assert res.metadata["negative_prompt"] is None and res.metadata["nfe"] == 4
    assert by_name.metadata["prompt"] == " tabby cat "  # the prompt is recorded as given
    assert torch.equal(by_index.latent, by_name.latent) and torch.equal(by_index.latent, by_label.latent)
    other = sampler.generate([req("dog")])[0]
    assert other.metadata["class_label"] == 5 and not torch.equal(other.latent, by_index.latent)


def test_same_seed_same_latent(sampler):
    a, b, c = sampler.generate([req("7", seed=4), req("7", seed=4), req("7", seed=5)])
    assert torch.equal(a.latent, b.latent) and np.array_equal(a.image, b.image)
    assert not torch.equal(a.latent, c.latent)


def reference_solve(model, label: int, seed: int, guidance: float, steps: int, solver: str) -> torch.Tensor:
    """An independent solve on the uniform grid: two separate forwards (label, null class) combined by CFG."""
    x = torch.randn((4, 4, 6), generator=torch.Generator().manual_seed(seed))[None]
    cond, null = torch.tensor([label]), torch.tensor([model.config.num_classes])

    def velocity(z, t):
        t_in = torch.full((1,), t)
        v_c, v_u = model(z, t_in, labels=cond), model(z, t_in, labels=null)
        return v_u + guidance * (v_c - v_u)

    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t0, t1 in pairwise(times):
            h = t1 - t0
            if solver == "euler":
                x = x + h * velocity(x, t0)
            else:  # midpoint: the slope at the midpoint reached by a half Euler step
                x = x + h * velocity(x + h / 2 * velocity(x, t0), t0 + h / 2)
    return x[0]


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_guidance_is_against_the_null_class(sampler, solver):
    options = {"seed": 9, "steps": 3, "solver": solver, "schedule": "uniform"}
    guided = sampler.generate([req("2", guidance=4.0, **options)])[0].latent
    plain = sampler.generate([req("2", guidance=1.0, **options)])[0].latent
    assert not torch.allclose(guided, plain, atol=1e-3)
    for latent, guidance in ((guided, 4.0), (plain, 1.0)):
        expected = reference_solve(sampler.model, 2, 9, guidance, 3, solver)
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=1e-5)


def test_a_batch_of_two_classes_equals_each_alone(parts):
    """models/sampler.py "Batching and determinism": bit-identical in the same slot (slot 0: "bird" both times), equal
    to float / 8-bit rounding in another (slot 1 vs 0: a BLAS may round a matmul row according to its index)."""
    s = Sampler.from_pretrained(parts["folder"], config={"batch_size": 2})
    pair = s.generate([req("bird", seed=5), req("8", seed=6)])
    alone = [s.generate([req("bird", seed=5)])[0], s.generate([req("8", seed=6)])[0]]
    assert [r.metadata["batch"] for r in pair] == [2, 2] and alone[0].metadata["slots"] == 2
    assert torch.equal(pair[0].latent, alone[0].latent) and np.array_equal(pair[0].image, alone[0].image)
    torch.testing.assert_close(pair[1].latent, alone[1].latent, rtol=1e-4, atol=1e-5)
    diff = np.abs(pair[1].image.astype(np.int16) - alone[1].image.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # a pixel next to a rounding boundary may move one level
    assert not torch.equal(pair[0].latent, pair[1].latent)


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "zebra"}, r"prompt 'zebra' is neither a class index in \[0, 10\) nor one of its 10 class names"),
    ({"prompt": "10"}, r"class label 10 is outside \[0, 10\)"),
    ({"prompt": "-1"}, r"class label -1 is outside \[0, 10\)"),
    ({"class_label": 10}, r"class label 10 is outside \[0, 10\).*null class"),
    ({"class_label": "3"}, "class_label must be an integer"),
    ({"negative_prompt": "blurry"}, "no negative prompt"),
])
def test_bad_class_requests_fail_clearly(sampler, bad, match):
    options = dict(bad)  # the parametrised dict is shared between runs: never mutate it
    prompt = options.pop("prompt", "3")
    with pytest.raises(ValueError, match=match):
        sampler.generate([req(prompt, **options)])


def test_folder_without_class_names_and_bad_setups(parts, tmp_path):
    bare = Sampler.from_pretrained(parts["bare"], config={"steps": 1})
    assert bare.generate([req("4")])[0].metadata["class_name"] is None  # indices need no names
    with pytest.raises(ValueError, match="records no class_names"):
        bare.generate([req("deer")])
    with pytest.raises(ValueError, match="takes no text encoder"):
        Sampler.from_pretrained(parts["folder"], text_encoder="some/encoder")
    wrong = make_tiny_model_folder(tmp_path / "wrong", vae=parts["vae"], preset_name="tiny-class",
                                   class_names=["cat", "dog"])
    with pytest.raises(ValueError, match="class_names has 2 entries but the model has 10 classes"):
        Sampler.from_pretrained(wrong)


def test_generate_cli_writes_pngs_and_sidecars_for_class_prompts(parts, tmp_path):
    common = ["--model", parts["folder"], "--size", "48x32", "--steps", "2", "--guidance", "3", "--seed", "7",
              "--log-level", "WARNING"]
    assert main([*common, "--prompt", "3", "--prompt", "tabby cat", "--out", str(tmp_path / "a")]) == 0
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == ["000000_7.png", "000001_8.png"]
    for png, prompt in zip(pngs, ["3", "tabby cat"]):
        assert Image.open(png).size == (48, 32)
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["prompt"] == prompt and meta["class_label"] == 3 and meta["class_name"] == "Tabby Cat"
        assert meta["guidance"] == 3.0 and meta["nfe"] == 4
    # the class name at seed 7 gives the same bytes as the index at seed 7
    assert main([*common, "--prompt", "Tabby Cat", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "000000_7.png").read_bytes() == pngs[0].read_bytes()
    with pytest.raises(ValueError, match="'zebra'"):
        main([*common, "--prompt", "zebra", "--out", str(tmp_path / "c")])
