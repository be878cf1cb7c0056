"""A job submitted through the Ray Jobs API to a real `ray start --head` cluster, as users submit to a cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.helpers import random_nextdit, stop_processes_matching

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head` on 127.0.0.1 with the dashboard (the Jobs API lives there); stopped by its own temp dir."""
    port, dashboard = free_port(), free_port()
    # the head's PATH as a user's shell has it (the virtualenv not activated): the README's recipe names the
    # virtualenv's interpreter in the entrypoint instead
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats",
         # every port explicit: other Ray instances on this machine hold the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_processes_matching(temp_dir)  # only this head's processes
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submitted_with_working_dir_runs_and_writes_its_output(head_node, tmp_path):
    """The README's local-cluster recipe: `ray job submit --working-dir . -- "$PWD/.venv/bin/python" -m jobs.…`."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from models import NextDiT, preset

    model = random_nextdit(preset("tiny"))
    model.save_pretrained(str(tmp_path / "src"))
    client = JobSubmissionClient(head_node)
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after `ray start` returns
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m jobs.convert --to official {tmp_path / 'src'} {tmp_path / 'out'}",
                runtime_env={"working_dir": str(REPO_ROOT),
                             "excludes": [".venv", ".git", "**/__pycache__", ".pytest_cache", ".schemathesis", "out"]},
            )
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    converted = NextDiT.from_pretrained(str(tmp_path / "out"))
    for key, value in model.state_dict().items():
        assert (converted.state_dict()[key] == value).all()
