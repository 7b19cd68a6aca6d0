#!/usr/bin/env bash
# Sets up megrez in .venv (first run only) and runs it. With no arguments: an interactive
# chat with the default model (no download needed). Otherwise the arguments go to `megrez`:
#   ./run.sh generate "你好"          ./run.sh chat --model Infinigence/Megrez2-3x7B-A3B
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh serve
. .venv/bin/activate
if [ "$#" -eq 0 ]; then set -- chat; fi
exec megrez "$@"
