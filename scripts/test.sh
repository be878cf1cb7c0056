#!/usr/bin/env bash
# Run the test suite (sets up .venv first, idempotently). Extra arguments go to pytest, e.g. the quick tier:
#   ./scripts/test.sh -m "not integration"   (no Ray, S3 server, Serve or subprocess: see tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 WANDB_MODE=offline
set +e
# --durations: the slowest tests close the log, since the suite has a time budget (README, Development)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then echo "no tests collected"; exit 1; fi
exit "$code"
