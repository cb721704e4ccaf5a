#!/usr/bin/env bash
# Set up (first run only) and start the server on the default backbone with the shipped example tasks.
# Extra arguments go to `supermask serve` (e.g. --host 0.0.0.0 --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/supermask serve "$@"
