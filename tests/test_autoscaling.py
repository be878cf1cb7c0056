"""Custom resources per stage against Ray's autoscaler: a prepare run whose VAE stage asks for a custom resource that only
an autoscaled node type has scales that node type up from zero and back down when the run is done.

The cluster is this test's own (`ray start --head` with the fake multi-node provider, every port explicit, everything on
127.0.0.1), never the session `ray_cluster`: a driver connects to one cluster only, so the job runs in a subprocess.
`ray.cluster_utils.AutoscalingCluster` is not used: its start() and shutdown() call `ray stop --force`, which would stop
every Ray on the machine. The cluster is stopped by its own temp dir, SIGTERM then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.helpers import stop_processes_matching
from tests.pipelines_fixtures import make_vae, write_images

RAY = str(Path(sys.executable).with_name("ray"))
NODE_TYPE = "encode_node"
RESOURCE = "encode_gpu"


def autoscaling_config(gcs_address: str) -> dict:
    """The fake multi-node provider's cluster config: a 2-CPU head, and up to one `encode_node` that starts at zero."""
    return {
        "cluster_name": "prepare-autoscaling-test",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     "gcs_address": gcs_address},  # else the provider joins new nodes to the default port 6379
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {"resources": {"CPU": 1, RESOURCE: 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s: scale down soon after the encode actor is gone
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaling_head():
    """A head with the autoscaler (fake multi-node provider); yields its GCS address, then stops only its processes."""
    temp_dir = tempfile.mkdtemp(prefix="rayas-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    # RAY_TMPDIR: the nodes the autoscaler starts put their files (and so their command lines) under this temp dir too
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1",
               AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_TMPDIR=temp_dir,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             f"--temp-dir={temp_dir}", f"--autoscaling-config={config}", "--include-dashboard=false",
             "--disable-usage-stats",
             # every port explicit: other Ray instances on this machine hold the defaults
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--ray-client-server-port={free_port()}"],
            check=True, env=env, capture_output=True, timeout=180,
        )
        yield gcs, temp_dir
    finally:
        # only this cluster's processes: the head and the nodes the autoscaler started (temp dir or GCS address)
        stop_processes_matching(temp_dir, gcs.replace(".", r"\.") + "([^0-9]|$)")
        shutil.rmtree(temp_dir, ignore_errors=True)


# The driver: runs the prepare job on the cluster while a thread watches for the encode node, then waits (bounded) for
# the autoscaler to remove it. Prints one JSON line.
DRIVER = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    from models.config_io import from_dict
    from pipelines.config import PrepareConfig
    from pipelines.plan import run_prepare

    address, corpus, output, vae = sys.argv[1:5]

    def encode_nodes():
        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("{resource}", 0) > 0]

    ray.init(address=address, runtime_env={{"env_vars": {{"PYTHONPATH": "{repo}"}}}})
    before = len(encode_nodes())
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(len(encode_nodes()))
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    cfg = from_dict(PrepareConfig, {{
        "inputs": [corpus], "output": output, "progress": False,
        "read": {{"modalities": ["image"]}},
        "bucket": {{"image": {{"max_patches": 64}}}},
        "encode": {{"vae": vae, "vae_resources": {{"num_cpus": 0.5, "custom": {{"{resource}": 0.5}},
                                                   "concurrency": 1, "batch_size": 4}}}},
    }})
    stats = run_prepare(cfg)
    done.set()
    peak = max(seen + [len(encode_nodes())])
    deadline, after = time.time() + 180, None
    while time.time() < deadline:
        after = len(encode_nodes())
        if after == 0:
            break
        time.sleep(1)
    print("RESULT " + json.dumps({{"before": before, "peak": peak, "after": after, "written": stats["run"]["written_samples"]}}))
""").format(resource=RESOURCE, repo=REPO_ROOT)


def test_encode_stage_custom_resource_scales_node_type_up_and_down(autoscaling_head, tmp_path):
    gcs, _ = autoscaling_head
    images = write_images(tmp_path / "corpus", 6, seed=5)
    vae = make_vae(tmp_path / "vae")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, gcs, str(tmp_path / "corpus"), str(tmp_path / "out"), vae],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["before"] == 0  # the node type starts at zero
    assert result["peak"] == 1  # the encode stage's custom resource brought one up
    assert result["written"] == len(images)  # every sample was VAE-encoded (on that node: no other has the resource)
    assert result["after"] == 0, "the autoscaler did not remove the idle encode node"
