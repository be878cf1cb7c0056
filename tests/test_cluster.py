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


EMBEDDED = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from jobs.runtime import init_ray
import ray
init_ray(num_cpus=1)
node = ray._private.worker.global_worker.node
print(json.dumps({{"dashboard": node.address_info["webui_url"],
                  "pids": [p.process.pid for procs in node.all_processes.values() for p in procs]}}), flush=True)
time.sleep(300)
"""


def test_the_embedded_cluster_keeps_token_auth_serves_its_state_api_on_loopback_and_dies_with_its_driver(tmp_path):
    """jobs.runtime.init_ray's local cluster as a user gets it (RAY_AUTH_MODE unset): Ray's token authentication on,
    so its dashboard and state API (on 127.0.0.1, where Ray Train's placement-group cleaner asks whether its
    controller lives) refuse a request without the token and answer one with it; a SIGTERM to the driver alone, as
    Kubernetes or `kill` sends, leaves none of the cluster's processes (GCS, raylet, dashboard) behind."""
    import json
    import signal
    import urllib.error
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # Ray writes the cluster's token under ~/.ray
    driver = subprocess.Popen([sys.executable, "-c", EMBEDDED.format(root=str(REPO_ROOT))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    info = {"pids": []}
    try:
        info = json.loads(driver.stdout.readline())
        url = f"http://{info['dashboard']}/api/v0/actors"
        assert info["dashboard"].startswith("127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code in (401, 403)
        token = (tmp_path / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and json.loads(response.read())["result"]
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
        deadline = time.time() + 30
        while (alive := [p for p in info["pids"] if running(p)]) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive, f"left running after the driver's SIGTERM: {alive}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in info["pids"]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_jobs_serve_stops_within_its_graceful_shutdown_on_sigterm_mid_solve(tmp_path):
    """`python -m jobs.serve` as a user runs it: it becomes ready, and a SIGTERM while a long solve runs ends the process and
    its local cluster within graceful_shutdown_s plus Ray's own stop, where Serve alone drains the Ingress and then the
    sampler for their timeouts one after the other (docs/architecture.md#shutdown)."""
    import signal
    import threading

    import httpx

    from models.tiny import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    model = make_tiny_model_folder(tmp_path / "m", make_tiny_text_encoder(tmp_path / "te"), make_tiny_vae(tmp_path / "vae"))
    port, grace = free_port(), 3
    temp_dir = tempfile.mkdtemp(prefix="rayserve-", dir="/tmp")  # names this cluster's processes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = temp_dir
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", "--model", model, "--port", str(port), "--set", f"graceful_shutdown_s={grace}",
         "--set", "sampler.max_side=512", "--set", f"sampler.max_pixels={512 * 512}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(log := open(tmp_path / "serve.log", "w")))  # noqa: SIM115
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.time() + 180
            while True:
                assert driver.poll() is None and time.time() < deadline, "jobs.serve did not become ready"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        # minutes on this tiny CPU model; the first request of a replica, so no measured cost refuses it up front
        long = {"prompt": "a slow circle", "size": "512x512", "steps": 100, "n": 4}
        answered = []

        def post_long():
            try:
                answered.append(httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json=long, timeout=120))
            except httpx.TransportError:
                pass  # the server goes away under it: that is the point

        threading.Thread(target=post_long, daemon=True).start()
        time.sleep(3)
        assert not answered, answered[0].text  # the solve is running
        began = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=120)
        log.close()
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        # Serve alone took 2 × 20 s; ray.shutdown after the grace takes a few seconds on a loaded 2-core machine
        assert time.monotonic() - began < grace + 20
        found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True, check=False)
        assert not found.stdout.split(), f"left running after jobs.serve's shutdown: {found.stdout}"
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_processes_matching(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
