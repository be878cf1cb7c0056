"""Hugging Face Hub ids as model paths (docs/architecture.md#model-paths): resolved through huggingface_hub's cache,
offline (HF_HUB_OFFLINE), against a cache the test fills beforehand the way a download lays it out. Nothing reaches
the network."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.config_io import ConfigError
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo: str, folder, commit: str = COMMIT) -> None:
    """``folder`` as huggingface_hub caches a download of ``repo`` at ``commit``: refs/main names the snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding acme/tiny-nextdit, whose metadata names its text encoder and VAE by their
    Hub ids (acme/tiny-text-encoder, acme/tiny-vae), also cached; and the same model as a local folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    te, vae = make_tiny_text_encoder(tmp_path / "te"), make_tiny_vae(tmp_path / "vae")
    local = make_tiny_model_folder(tmp_path / "local-model", te, vae)
    published = tmp_path / "published"
    shutil.copytree(local, published)
    config = json.loads((published / "config.json").read_text())
    config["text_encoder"]["path"], config["vae"]["path"] = "acme/tiny-text-encoder", "acme/tiny-vae"
    (published / "config.json").write_text(json.dumps(config))
    cache_repo(cache, "acme/tiny-nextdit", published)
    cache_repo(cache, "acme/tiny-text-encoder", te)
    cache_repo(cache, "acme/tiny-vae", vae)
    return {"local": local, "cache": cache}


def test_a_model_folder_its_text_encoder_and_vae_load_by_hub_id_offline(hub):
    from models import NextDiT
    from models.sampler import GenerationRequest, Sampler

    by_id, local = NextDiT.from_pretrained("acme/tiny-nextdit"), NextDiT.from_pretrained(hub["local"])
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in by_id.state_dict().items())
    pinned = NextDiT.from_pretrained(f"acme/tiny-nextdit@{COMMIT}")  # a revision: the snapshot of that commit
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in pinned.state_dict().items())
    request = GenerationRequest("a red cat", width=64, height=64, seed=3, steps=2)
    (hub_image,) = Sampler.from_pretrained("acme/tiny-nextdit").generate([request])
    (local_image,) = Sampler.from_pretrained(hub["local"]).generate([request])
    assert np.array_equal(hub_image.image, local_image.image)  # same weights, encoder and VAE, one process


def test_offline_with_nothing_cached_is_a_clear_error(hub):
    from models import NextDiT
    from models.sampler import Sampler

    for load in (NextDiT.from_pretrained, Sampler.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"Hub repo acme/missing is not in the Hugging Face cache .*"
                                                    r"HF_HUB_OFFLINE is set.*huggingface-cli download acme/missing"):
            load("acme/missing")


def test_a_local_folder_of_the_same_relative_name_wins(hub, tmp_path, monkeypatch):
    from models import NextDiT, preset
    from models.tiny import random_nextdit

    other = random_nextdit(preset("tiny"), seed=7)
    monkeypatch.chdir(tmp_path)
    other.save_pretrained("acme/tiny-nextdit", fmt="ours")
    loaded = NextDiT.from_pretrained("acme/tiny-nextdit")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_push_to_hub_is_refused_before_anything_is_exported(hub, tmp_path):
    from jobs.export import main as export

    out = tmp_path / "exported"
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        export([str(tmp_path / "no-run"), str(out), "--push-to-hub", "acme/tiny-nextdit"])
    with pytest.raises(ConfigError, match="is not a Hub repo id"):
        export([str(tmp_path / "no-run"), str(out), "--push-to-hub", "not a repo"])
    assert not out.exists()
