#!/usr/bin/env bash
# Creates .venv (once) and installs megrez into it, editable, with optional extras:
#   scripts/setup.sh [serve|test|...]
# Where torch is missing it installs the pinned torch build; an existing torch (e.g. your
# CUDA build) is kept, since the package only asks for torch>=2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
