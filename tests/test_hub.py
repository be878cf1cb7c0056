"""Hugging Face Hub ids as model paths (docs/architecture.md#model-paths): resolved through huggingface_hub's cache,
offline (HF_HUB_OFFLINE), against a cache the test fills beforehand the way a download lays it out. Nothing reaches
the network."""

from __future__ import annotations

import json
import logging
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


TOKEN = "hf_test_token"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake Hub on 127.0.0.1 (tests/fake_hub.py) that huggingface_hub uploads to, for this test only: HfApi takes its
    endpoint from constants.ENDPOINT when it is made (and passes it on), so patching the constant redirects it; online,
    where the suite runs with HF_HUB_OFFLINE=1; hf_xet off, since with it upload_folder sends the bytes to a Xet
    storage server instead of the single commit the fake Hub serves (is_xet_available reads the constant at each
    call); and the token in HF_TOKEN, which huggingface_hub reads from the environment at each request."""
    from huggingface_hub import constants

    from tests.fake_hub import FakeHub

    with FakeHub(tmp_path / "fake-hub", token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def export_a_tiny_model(monkeypatch) -> None:
    """Make jobs.export's export step write a tiny model folder in the export's layout (config.json with Hub-id
    references, model.safetensors, ema.safetensors) instead of consolidating a checkpoint: a real checkpoint is a
    DeepSpeed ZeRO one that only a Ray Train run writes (tests/test_train_ray.py exports those). What runs for real is
    main's wiring around it: the repo check, then the push of the folder it wrote."""
    import jobs.export
    from models import preset
    from models.tiny import random_nextdit

    def export(checkpoint_uri: str, out_dir: str, ema: bool = True) -> str:
        model, ema_model = random_nextdit(preset("tiny"), seed=0), random_nextdit(preset("tiny"), seed=1)
        model.save_pretrained(out_dir, ema_state=ema_model.state_dict(),
                              metadata={"text_encoder": {"path": "acme/tiny-text-encoder"},
                                        "vae": {"path": "acme/tiny-vae"}})
        return checkpoint_uri

    monkeypatch.setattr(jobs.export, "export", export)


def test_push_to_hub_uploads_the_exported_folder_over_http(fake_hub, tmp_path, monkeypatch, caplog):
    """jobs.export --push-to-hub org/tiny --private, against the fake Hub: the repo is created private, every request
    carries HF_TOKEN as its bearer token, every file of the exported folder arrives byte for byte in one commit, and
    the job logs that commit's URL."""
    from jobs.export import main as export

    export_a_tiny_model(monkeypatch)
    out = tmp_path / "exported"
    caplog.set_level(logging.INFO, logger="jobs.export")
    assert export([str(tmp_path / "run"), str(out), "--push-to-hub", "org/tiny", "--private"]) == 0

    assert fake_hub.unanswered == []  # the client asked for nothing the fake Hub does not serve
    assert fake_hub.created == {"org/tiny": {"name": "tiny", "organization": "org", "visibility": "private",
                                             "type": "model"}}
    assert [r["path"] for r in fake_hub.requests] == ["/api/repos/create", "/api/models/org/tiny/preupload/main",
                                                      "/api/models/org/tiny/commit/main"]
    assert {r["authorization"] for r in fake_hub.requests} == {f"Bearer {TOKEN}"}
    exported = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(exported) == ["config.json", "ema.safetensors", "model.safetensors"]
    assert fake_hub.files("org/tiny") == exported
    (commit,) = fake_hub.commits["org/tiny"]
    assert commit["summary"] == f"jobs.export of {out}"
    assert f"pushed to the Hub: {fake_hub.url}/org/tiny/commit/{commit['oid']}" in caplog.text


def test_a_refused_token_fails_the_push_naming_the_repo_and_hf_token(fake_hub, tmp_path, monkeypatch):
    """A token the Hub refuses (401 on create_repo, and on the repo lookup huggingface_hub tries next, as a bad token
    is refused everywhere) fails the job with an error naming the repo and HF_TOKEN; nothing is committed and the
    exported folder stays."""
    from jobs.export import main as export

    export_a_tiny_model(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_token")
    out = tmp_path / "exported"
    with pytest.raises(RuntimeError, match=r"Hub repo org/tiny failed \(HTTP 401\): the token \(HF_TOKEN, "):
        export([str(tmp_path / "run"), str(out), "--push-to-hub", "org/tiny"])
    assert fake_hub.requests[0]["path"] == "/api/repos/create"
    assert fake_hub.created == {} and fake_hub.commits == {} and fake_hub.unanswered == []
    assert (out / "model.safetensors").exists()
