"""``python -m jobs.generate`` end to end with a tiny random text encoder, VAE and model folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from jobs.generate import main
from models.config_io import ConfigError
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    te, vae = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    return {"model": make_tiny_model_folder(root / "model", te, vae), "te": te, "vae": vae}


def args(parts, out, *extra):
    return ["--model", parts["model"], "--size", "80x48", "--steps", "2", "--solver", "midpoint", "--schedule",
            "sigmoid", "--guidance", "3", "--seed", "7", "--out", str(out), "--log-level", "WARNING", *extra]


def test_pngs_of_the_requested_size_with_sidecars_deterministic_per_seed(parts, tmp_path):
    assert main(args(parts, tmp_path / "a", "--prompt", "a red cat", "--prompt", "a blue dog",
                     "--text-encoder", parts["te"], "--vae", parts["vae"])) == 0
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == ["000000_7.png", "000001_8.png"]  # image i gets seed + i
    for png in pngs:
        assert Image.open(png).size == (80, 48)  # width × height, non-square
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["nfe"] == 4 and meta["steps"] == 2 and meta["solver"] == "midpoint" and meta["seconds"] > 0
        assert meta["width"] == 80 and meta["height"] == 48 and meta["guidance"] == 3.0
    # text encoder and VAE from the folder's metadata this time, one prompt only: the seed-7 image is identical
    assert main(args(parts, tmp_path / "b", "--prompt", "a red cat")) == 0
    assert (tmp_path / "b" / "000000_7.png").read_bytes() == pngs[0].read_bytes()
    assert main(args(parts, tmp_path / "c", "--prompt", "a red cat", "--seed", "8")) == 0
    assert (tmp_path / "c" / "000000_8.png").read_bytes() != pngs[0].read_bytes()


def test_config_file_and_set_overrides(parts, tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text("sampler:\n  solver: euler\n  schedule:\n    name: rational\n    shift: 2.0\n")
    assert main(args(parts, tmp_path / "o", "--prompt", "a cat", "--config", str(config), "--set",
                     "sampler.cfg_channels=3", "--set", "images_per_prompt=2", "--solver", "heun",
                     "--set", "sampler.schedule.name=rational")) == 0  # --set wins over the named --schedule
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "o").glob("*.json"))]
    assert len(metas) == 2 and metas[0]["solver"] == "heun"  # the named flag wins over the file
    assert metas[0]["schedule"] == {"name": "rational", "shift": 2.0} and metas[0]["cfg_channels"] == 3


@pytest.mark.parametrize("extra,match", [
    (["--size", "81x48"], "multiple of 16"), (["--size", "4096x64"], "exceeds the maximum"),
    (["--steps", "0"], "steps"), (["--solver", "leapfrog"], "unknown solver"),
    (["--schedule", "cosine"], "unknown schedule"), (["--size", "big"], "WIDTHxHEIGHT"),
    (["--size", "６４x６４"], "WIDTHxHEIGHT"),  # other scripts' digits: int() takes them, the API refuses them
    (["--set", "sampler.rope.mode=yarn"], "unknown RoPE scaling mode"), (["--set", "nope=1"], "unknown config key"),
])
def test_bad_input_fails_with_a_clear_error(parts, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        main(args(parts, tmp_path, "--prompt", "a cat", *extra))


def test_empty_prompt_list_and_exit_code(parts, tmp_path):
    with pytest.raises(ConfigError, match="no prompts"):
        main(args(parts, tmp_path))
    proc = subprocess.run([sys.executable, "-m", "jobs.generate", *args(parts, tmp_path, "--steps", "0",
                                                                        "--prompt", "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "config error" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_loads_nothing(parts, tmp_path, capsys):
    assert main(args(parts, tmp_path / "dry", "--prompt", "a", "--prompt", "b", "--dry-run")) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert not (tmp_path / "dry").exists()


def test_prompt_file_runs_as_ray_data_job_writing_to_s3(parts, tmp_path, ray_cluster, s3_bucket):
    import fsspec

    from models.storage import storage_options

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("a red cat\n" + json.dumps({"prompt": "a blue dog", "seed": 42, "width": 32}) + "\n"
                       "a green tree\n")
    out = f"s3://{s3_bucket}/gen"
    assert main(args(parts, out, "--prompt-file", str(prompts), "--set", "ray.batch_size=2")) == 0
    fs = fsspec.filesystem("s3", **storage_options(out))
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/gen"))
    assert names == ["000000_7.json", "000000_7.png", "000001_42.json", "000001_42.png",
                     "000002_9.json", "000002_9.png"]
    with fs.open(f"{s3_bucket}/gen/000001_42.png", "rb") as f:
        assert Image.open(f).size == (32, 48)
    # the same seed through the local path gives the same bytes as through the actor pool
    assert main(args(parts, tmp_path / "local", "--prompt", "a red cat")) == 0
    assert fs.cat(f"{s3_bucket}/gen/000000_7.png") == (tmp_path / "local" / "000000_7.png").read_bytes()


def test_official_sampler_preset_is_one_setting_away(parts, tmp_path, capsys):
    """``--set sampler=official``: the official demo's sampling (midpoint on 30 grid points of the shift-4 schedule, CFG 4
    on the first 3 channels, the main branch's RoPE rule); named flags and later --set keys still apply on top."""
    def dry_run(*extra):
        capsys.readouterr()
        assert main(["--model", parts["model"], "--prompt", "a cat", "--dry-run", *extra]) == 0
        return json.loads(capsys.readouterr().out)["config"]["sampler"]

    official = dry_run("--set", "sampler=official")
    assert official["steps"] == 29 and official["solver"] == "midpoint" and official["guidance"] == 4.0
    assert official["schedule"]["name"] == "rational" and official["schedule"]["shift"] == 4.0
    assert official["cfg_channels"] == 3 and official["rope"]["mode"] == "official_switch"
    assert official["rope"]["policy"] == "area"
    tuned = dry_run("--steps", "12", "--set", "sampler=official", "--set", "sampler.guidance=5")
    assert tuned["steps"] == 12 and tuned["guidance"] == 5.0 and tuned["schedule"]["name"] == "rational"
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        main(["--model", parts["model"], "--prompt", "a cat", "--dry-run", "--set", "sampler=fast"])
