#!/usr/bin/env bash
# The device checks of docs/benchmarks.md, for a session that is lent a GPU (H100/H200): correctness first (the model
# tests on CUDA), then every timing against its anchor in the same run. JSON lines and logs go to ${OUT:-out/gpu}.
#
#   here, once:   bash scripts/gpu_wheels.sh          (the image reaches no registry: diffusers, DeepSpeed … as wheels)
#   device run:   bash scripts/gpu_bench.sh STAGE...   with carry [".whl"];
#                 STAGE = model | train | train-compiled | sampler | encode | all
#
# Budget: 15 device-minutes a session (the machine's start included), 10 a command. Estimated: `model` (CUDA tests,
# 2B forward eager ± FP8 at 1024²/2048², compiled at 1024², issue 2) ≈ 6 min; `train` (2B ZeRO-3 steps at 512²/1024² and the
# largest micro-batch, issue 5) ≈ 3 min; `sampler` (one sampler step, one whole 1024² image, one 10-s audio clip of the
# `audio` preset with its step against the plain-PyTorch reference) ≈ 3 min;
# `encode` (jobs.prepare's VAE-encode stage, SDXL-shaped VAE at 1024², float32 and bfloat16, issue 21) ≈ 1 min;
# `train-compiled` (train.compile at 1024², one compile of a 2B block) ≈ 2 min. Run `model` in one call and
# `train sampler encode train-compiled` in the next, on the same warm machine (stages run in that order): a timeout
# cuts the last stage, and the files already under $OUT still come back. (`jobs.bench image --compile` adds three compiles of
# the 2B model, ~3 min: for a later session.)
# With .whl/ present the image's own python3 (its PyTorch) is used; elsewhere (a GPU box with network) our .venv.
#
# Rehearsal, here, before device minutes are spent:
#   REHEARSE=1 PYTHON=$(bash scripts/gpu_rehearsal_env.sh) OUT=/tmp/rehearsal bash scripts/gpu_bench.sh
# runs every command on the CPU with the tiny preset and small sizes under an interpreter set up like the image's
# (Python 3.12, its torch, no Ray, the .whl/ wheels): it catches a missing package or an API the older torch lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=" ${*:-all} "
want() { [[ "$STAGES" == *" $1 "* || "$STAGES" == *" all "* ]]; }
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
if [ -n "${REHEARSE:-}" ]; then
    DEVICE=cpu PRESET=tiny SIZE=128 LARGE=256 TRAIN_SIZES=128:4,256:1 MAX_BATCH=8 REPEATS=2
    AUDIO_PRESET=tiny-audio DURATION=2
else
    DEVICE=cuda PRESET=2B-GQA SIZE=1024 LARGE=2048 TRAIN_SIZES=512:4,1024:1 MAX_BATCH=64 REPEATS=10
    AUDIO_PRESET=audio DURATION=10
fi
if [ -d .whl ]; then
    PY=${PYTHON:-python3}
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
    export PYTHONPATH=$SITE:$PWD
else
    bash scripts/setup.sh
    PY=.venv/bin/python
fi
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
else
    echo "rehearsal on the CPU" | tee "$OUT/device.txt"
fi
$PY -c "import torch, diffusers, deepspeed; print('torch', torch.__version__, '| diffusers', diffusers.__version__, \
'| deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING | tee -a "$OUT/device.txt"

if want model; then
    # S3 tests need moto_server, which the image lacks; they test storage, not the GPU
    $PY -m pytest -q -x -p no:cacheprovider -m "not integration" -k "not s3" tests/test_gpu.py tests/test_model_parity.py \
        tests/test_model.py tests/test_rope.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
    # Anchor: diffusers LuminaNextDiT2DModel, 2B config, bf16, CFG pair, caption 128 (half padded), eager at 1024² and
    # 2048², compiled at 1024² (docs/benchmarks.md#peer-on-one-h100; a compile costs about a minute per model and size)
    $PY -m jobs.bench model --device $DEVICE --preset $PRESET --dtype bf16 --sizes $SIZE,$LARGE --caption-len 128 \
        --repeats $REPEATS --fp8 --profile --json "$OUT/model.jsonl" 2>&1 | grep -v Warning | tee "$OUT/model.txt"
    $PY -m jobs.bench model --device $DEVICE --preset $PRESET --dtype bf16 --sizes $SIZE --caption-len 128 \
        --repeats $REPEATS --fp8 --compile --json "$OUT/model.jsonl" 2>&1 | grep -v Warning | tee -a "$OUT/model.txt"
fi
if want train; then
    # Anchor: the peer's fwd+bwd rows of docs/benchmarks.md#peer-on-one-h100 (512² × 4, 1024² × 1); target ≥ 45% of
    # the measured matmul ceiling at 1024² under ZeRO-3 with activation checkpointing, and the largest micro-batch per
    # bucket.
    # torch AdamW: DeepSpeed's FusedAdam would spend device minutes on its JIT build (the step differs by ~1%).
    $PY -m jobs.bench train --device $DEVICE --preset $PRESET --sizes $TRAIN_SIZES --caption-len 128 --torch-adam \
        --max-batch $MAX_BATCH --repeats 5 --json "$OUT/train.jsonl" 2>&1 | grep -v -i "warn" | tee "$OUT/train.txt"
fi
if want sampler; then
    $PY -m jobs.bench sampler --device $DEVICE --preset $PRESET --sizes $SIZE,$LARGE 2>&1 | tee "$OUT/sampler.txt"
    # whole 1024² image: Gemma-2B-shaped encoder + SDXL-shaped VAE, 10 midpoint steps vs LuminaPipeline 20 Euler steps
    $PY -m jobs.bench image --device $DEVICE --preset $PRESET --size $SIZE --fp8 --json "$OUT/image.jsonl" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/image.txt"
    # text-to-audio (docs/benchmarks.md#text-to-audio-cpu): real-time factor of a 10-s clip through our Sampler (FLAN-T5-large-
    # shaped encoder, paper-sized mel VAE, Griffin-Lim on the CPU) with its per-stage split, and one CFG-pair step of
    # the `audio` preset against the plain-PyTorch reference (checked allclose first). About 1 min.
    $PY -m jobs.bench audio --device $DEVICE --preset $AUDIO_PRESET --duration $DURATION --json "$OUT/audio.jsonl" \
        2>&1 | grep -v -i "warn" | tee "$OUT/audio.txt"
fi
if want encode; then
    # jobs.prepare's VAE-encode stage on 1024² buckets with an SDXL-shaped VAE, float32 (the anchor) and bfloat16:
    # images/s per GPU, what a user sizes the encode-gpu group by (docs/benchmarks.md#vae-encode). About 1 min.
    $PY -m jobs.bench encode --device $DEVICE --size $SIZE --batch 8 --json "$OUT/encode.jsonl" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/encode.txt"
fi
if want train-compiled; then
    # train.compile (every block's forward compiled under ZeRO-3 + checkpointing) at the 1024² target bucket
    $PY -m jobs.bench train --device $DEVICE --preset $PRESET --sizes ${TRAIN_SIZES##*,} --caption-len 128 \
        --torch-adam --compile --no-peer --repeats 5 --json "$OUT/train.jsonl" 2>&1 | grep -v -i "warn" \
        | tee -a "$OUT/train.txt"
fi
echo "results in $OUT"
