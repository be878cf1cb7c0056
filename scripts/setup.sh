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
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "set-up done: $VENV"
