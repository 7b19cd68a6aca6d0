#!/usr/bin/env bash
# Creates .venv and installs megrez into it (editable), with optional extras:
#   scripts/setup.sh [serve|test|...]
# Once done for a given pyproject.toml and set of extras it returns at once (a stamp in .venv
# records what was installed), so ./run.sh and scripts/test.sh start without running pip.
# Where torch is missing it installs the pinned CPU build; an existing torch (e.g. your CUDA
# build) is kept, since the package only asks for torch>=2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stamp=".venv/.megrez-setup${extras:+-$extras}"
key="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/megrez ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
say() { printf 'setup: %s\n' "$*" >&2; }
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv (first run: a few minutes, most of it pip)"
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  say "installing torch 2.13.0 (CPU build)"
  python -m pip install --disable-pip-version-check "torch==2.13.0"
fi
say "installing megrez${extras:+[$extras]} (editable) and its dependencies"
python -m pip install --disable-pip-version-check -e ".${extras:+[$extras]}" \
  | grep -v --line-buffered '^Requirement already satisfied' || true
python -c "import megrez" || { say "megrez did not install; see the pip output above"; exit 1; }
echo "$key" > "$stamp"
say "ready in $((SECONDS - started))s. To use megrez from any shell: . $PWD/.venv/bin/activate"
say "(or link it once: ln -s $PWD/.venv/bin/megrez ~/.local/bin/megrez)"
