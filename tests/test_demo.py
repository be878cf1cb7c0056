"""The README's first command, shortened: the whole platform end to end on the embedded default."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs.demo import DemoConfig, run
from jobs.demo_data import DemoCounts


def test_shortened_demo_runs_end_to_end(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), counts=DemoCounts(images=48, tones=3, solids=3), steps=20, seeds_per_prompt=1,
                     sample_steps=2)
    report = run(cfg)

    # every modality curated, every corrupt file rejected with a reason, the job did not fail
    manifest = pq.read_table(out / "curated" / "manifest.parquet").to_pylist()
    assert {row["modality"] for row in manifest} == {"image", "audio", "points"}
    rejects = pq.read_table(out / "curated" / "rejects.parquet").to_pylist()
    rejected_sources = " ".join(row["source"] for row in rejects)
    for name in report["corrupt_inputs"]:
        assert name.split("/")[-1] in rejected_sources, name
    # trained, exported, served: one image per prompt came back over HTTP and was scored
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "ema.safetensors").exists()
    assert report["images"] == 12 and 0.0 <= report["prompt_fidelity"] <= 1.0
    assert report["loss_last"] < report["loss_first"]
    for name in ("samples.png", "loss.png", "report.json", "report.md"):
        assert (out / "report" / name).stat().st_size > 0
    saved = json.loads((out / "report" / "report.json").read_text())
    assert set(saved["timings_s"]) >= {"prepare (Ray Data)", "train (Ray Train + DeepSpeed ZeRO-3)", "total"}
