#!/usr/bin/env bash
# Create ./.venv and install the project into it (idempotent; re-runs when pyproject.toml changes).
# torch is installed first, pinned to a CPU build that satisfies the project's range.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${SUPERMASK_TORCH_SPEC:-torch==2.13.0}"
VENV=".venv"
STAMP="$VENV/.supermask-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bootstrap: creating $VENV with $($PYTHON --version)" >&2
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "bootstrap: installing $TORCH_SPEC" >&2
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
echo "bootstrap: installing the project and its test dependencies" >&2
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$STAMP"
