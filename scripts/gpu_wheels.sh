#!/usr/bin/env bash
# Wheels of what the lent GPU machine's image lacks (it reaches no package registry): diffusers (the peer of every
# benchmark), DeepSpeed (built here as a pure-Python wheel: its CUDA ops are JIT-built where they run) and their missing
# dependencies, for the image's CPython 3.12, at the versions of our .venv. Writes .whl/ (git-ignored); pass
# carry [".whl"] to the device run and start it with `bash scripts/gpu_bench.sh` (which installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
PY=.venv/bin/python
version() { $PY -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pins=()
for name in diffusers hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
        importlib-metadata lazy-importer; do
    pins+=("$name==$(version "$name")")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls -la .whl
du -sh .whl
