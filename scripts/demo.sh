#!/usr/bin/env bash
# The main job end to end on the embedded default (sets up .venv first, idempotently). Extra arguments go to jobs.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python -m jobs.demo "$@"
