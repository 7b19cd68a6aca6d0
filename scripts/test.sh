#!/usr/bin/env bash
# The test command: sets up .venv with the test extras and runs the tests (CPU only, no network).
#   scripts/test.sh            the quick run: everything but the tests marked slow
#   scripts/test.sh --all      everything, as CI runs it
#   scripts/test.sh -k chat    extra arguments go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  select=()
  shift
fi
bash scripts/setup.sh test || exit 1
. .venv/bin/activate
python -m pytest -q "${select[@]}" "$@"
rc=$?
# pytest exits 5 when it collected no tests (e.g. a -k that matches nothing): not a failure.
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
