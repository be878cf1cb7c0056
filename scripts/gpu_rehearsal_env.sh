#!/usr/bin/env bash
# A Python 3.12 virtualenv set up like the lent GPU machine's image (the device tool's KINDS.md: torch 2.11,
# transformers 5.17, numpy 2.5.2 …; no Ray, no moto, no diffusers or DeepSpeed: those come from .whl/), for the
# rehearsal of the device checks here:  REHEARSE=1 PYTHON=$(bash scripts/gpu_rehearsal_env.sh) bash scripts/gpu_bench.sh
# Idempotent; about 3 GB (PyPI's torch 2.11 is a CUDA build, which runs on the CPU too). Prints the interpreter's path.
set -euo pipefail
DIR=${1:-/tmp/gpu-image-py312}
PY312=${PY312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
if [ -z "$PY312" ]; then
    echo "no python3.12 here: set PY312 to one" >&2
    exit 1
fi
[ -x "$DIR/bin/python3" ] || "$PY312" -m venv "$DIR" >&2
"$DIR/bin/python3" -m pip install -q "torch==2.11.0" "torchaudio==2.11.0" "torchvision==0.26.0" "numpy==2.5.2" \
    "transformers==5.17.0" "huggingface_hub==1.33.0" "safetensors==0.8.0" "accelerate==1.15.0" "tokenizers==0.23.2" \
    peft pyyaml pillow tqdm pytest pytest-timeout sentencepiece psutil einops fsspec requests msgpack py-cpuinfo \
    ninja nvidia-ml-py packaging regex scipy pandas pyarrow > "$DIR/install.log" 2>&1 \
    || { tail -20 "$DIR/install.log" >&2; exit 1; }
echo "$DIR/bin/python3"
