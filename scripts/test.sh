#!/usr/bin/env bash
# The test command: sets up .venv with the test extras and runs the whole suite (CPU only,
# no network). Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
. .venv/bin/activate
python -m pytest -q "$@"
rc=$?
# pytest exits 5 when it collected no tests (e.g. a -k that matches nothing): not a failure.
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
