"""``python -m jobs.convert`` in every direction, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import torch

from models import NextDiT, preset
from tests.conftest import REPO_ROOT
from tests.helpers import random_nextdit


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.convert", *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_convert_cycle_keeps_every_weight(tmp_path):
    """Every direction through the job's main(), in this process (a new interpreter per step would spend its time
    importing torch and diffusers); the command line as a user runs it: the bad-source test below."""
    from jobs.convert import main

    model = random_nextdit(preset("tiny"))
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path / "ours"), ema_state=ema, metadata={"text_encoder": "te"})
    steps = [("official", "ours", "official"), ("diffusers", "official", "diffusers"), ("ours", "diffusers", "back")]
    for fmt, src, dst in steps:
        assert main(["--to", fmt, str(tmp_path / src), str(tmp_path / dst)]) == 0
    back = NextDiT.from_pretrained(str(tmp_path / "back"))
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # EMA survives ours → official → (loaded)
    official_ema = NextDiT.from_pretrained(str(tmp_path / "official"), ema=True)
    assert torch.equal(official_ema.state_dict()["x_embedder.weight"], ema["x_embedder.weight"])


def test_convert_reports_a_bad_source(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_convert("--to", "ours", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "no Next-DiT checkpoint" in result.stderr
    result = run_convert("--to", "onnx", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode == 2 and "invalid choice" in result.stderr
