#!/usr/bin/env bash
# The device checks of docs/benchmarks.md in one call, for a session that is lent a GPU (H100/H200):
# correctness first (the model tests on CUDA), then every timing against its anchor in the same run.
# Writes JSON lines and the full log under ${OUT:-out/gpu}. Usage: bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -m pytest -q -x tests/test_model_parity.py tests/test_model.py tests/test_rope.py -m "not slow" 2>&1 | tail -3 | tee "$OUT/tests.txt"
# Anchor: diffusers LuminaNextDiT2DModel, 2B config, bf16, CFG pair, caption 128 (half padded) — anchors.md
$PY -m jobs.bench model --device cuda --preset 2B-GQA --dtype bf16 --sizes 1024,2048 --caption-len 128 \
    --repeats 10 --compile --json "$OUT/model.jsonl" 2>&1 | tee "$OUT/model.txt"
$PY -m jobs.bench sampler --device cuda --preset 2B-GQA --sizes 1024,2048 2>&1 | tee "$OUT/sampler.txt"
echo "results in $OUT"
