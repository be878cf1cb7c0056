#!/usr/bin/env bash
# Idempotent set-up of the project virtualenv (.venv) with the pinned stack of pyproject.toml (its pitfalls:
# docs/architecture.md#stack-pitfalls).
# Reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ]; then exit 0; fi
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
export DS_BUILD_OPS=0   # DeepSpeed ops JIT-build on first use; never at install time
"$VENV/bin/pip" install --quiet --upgrade "pip>=23.2" setuptools wheel
"$VENV/bin/pip" install --quiet -e ".[dev]"
# The one op DeepSpeed builds even so: its CPU shared-memory collective (deepspeed_shm_comm), compiled the first time a
# process group starts on CPU (jobs.train, the tests' ZeRO-3 runs). About 40 s of C++ on 2 cores that would stall the
# first training on a fresh machine: built once here, into ~/.cache/torch_extensions (a machine without a compiler
# only loses the head start: DeepSpeed then tries again on first use, as it would have).
"$VENV/bin/python" - <<'PY' || echo "note: DeepSpeed's shared-memory op was not prebuilt; it builds on first use"
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
PY
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "set-up done: $VENV"
