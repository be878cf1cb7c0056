#!/usr/bin/env bash
# The device checks of docs/benchmarks.md, for a session that is lent a GPU (H100/H200): correctness first (the model
# tests on CUDA), then every timing against its anchor in the same run. JSON lines and logs go to ${OUT:-out/gpu}.
#
#   here, once:   bash scripts/gpu_wheels.sh          (the image reaches no registry: diffusers, DeepSpeed … as wheels)
#   device run:   bash scripts/gpu_bench.sh STAGE...   with carry [".whl"]; STAGE = model | train | sampler | all
#
# Budget: 15 device-minutes a session (the machine's start included), 10 a command. Estimated: `model` (CUDA tests,
# 2B forward eager ± FP8 at 1024²/2048², compiled at 1024², issue 2) ≈ 6 min; `train` (2B ZeRO-3 steps at 512²/1024² and the
# largest micro-batch, issue 5) ≈ 3 min; `sampler` (one sampler step, one whole 1024² image) ≈ 2 min. Run `model` in
# one call and `train sampler` in the next, on the same warm machine. (`jobs.bench image --compile` adds three
# compiles of the 2B model, ~3 min: for a later session.)
# With .whl/ present the image's own python3 (its PyTorch) is used; elsewhere (a GPU box with network) our .venv.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=" ${*:-all} "
want() { [[ "$STAGES" == *" $1 "* || "$STAGES" == *" all "* ]]; }
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3
else
    bash scripts/setup.sh
    PY=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, diffusers, deepspeed; print('torch', torch.__version__, '| diffusers', diffusers.__version__, \
'| deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING | tee -a "$OUT/device.txt"

if want model; then
    $PY -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_gpu.py tests/test_model_parity.py \
        tests/test_model.py tests/test_rope.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
    # Anchor: diffusers LuminaNextDiT2DModel, 2B config, bf16, CFG pair, caption 128 (half padded) — anchors.md;
    # eager at 1024² and 2048², compiled at 1024² (as anchors.md; a compile costs about a minute per model and size)
    $PY -m jobs.bench model --device cuda --preset 2B-GQA --dtype bf16 --sizes 1024,2048 --caption-len 128 \
        --repeats 10 --fp8 --json "$OUT/model.jsonl" 2>&1 | grep -v Warning | tee "$OUT/model.txt"
    $PY -m jobs.bench model --device cuda --preset 2B-GQA --dtype bf16 --sizes 1024 --caption-len 128 \
        --repeats 10 --fp8 --compile --json "$OUT/model.jsonl" 2>&1 | grep -v Warning | tee -a "$OUT/model.txt"
fi
if want train; then
    # Anchor: the peer's fwd+bwd rows of anchors.md (512² × 4, 1024² × 1); target ≥ 45% of the measured matmul
    # ceiling at 1024² under ZeRO-3 with activation checkpointing, and the largest micro-batch per bucket.
    # torch AdamW: DeepSpeed's FusedAdam would spend device minutes on its JIT build (the step differs by ~1%).
    $PY -m jobs.bench train --device cuda --preset 2B-GQA --sizes 512:4,1024:1 --caption-len 128 --torch-adam \
        --max-batch 64 --repeats 5 --json "$OUT/train.jsonl" 2>&1 | grep -v -i "warn" | tee "$OUT/train.txt"
fi
if want sampler; then
    $PY -m jobs.bench sampler --device cuda --preset 2B-GQA --sizes 1024,2048 2>&1 | tee "$OUT/sampler.txt"
    # whole 1024² image: Gemma-2B-shaped encoder + SDXL-shaped VAE, 10 midpoint steps vs LuminaPipeline 20 Euler steps
    $PY -m jobs.bench image --device cuda --preset 2B-GQA --size 1024 --fp8 --json "$OUT/image.jsonl" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/image.txt"
fi
echo "results in $OUT"
