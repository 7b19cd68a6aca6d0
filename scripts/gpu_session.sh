#!/usr/bin/env bash
# Everything that needs a GPU: correctness on CUDA against the CPU path, then the speed
# benchmarks (random weights of the real shapes; ceilings measured in the same run).
# Results: the tables on stdout, and text + JSON per stage in $OUT (default runs-out/gpu).
#
#   PYTHONPATH=src bash scripts/gpu_session.sh [tests|megrez2|megrez3b|offload|all]   (default all)
#
# A stage takes a few minutes; run them one per call where a call's time is limited.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-src}"
stage="${1:-all}"
run() { name=$1; shift; python -m megrez.cli "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v '^{'; tail -1 "$OUT/$name.txt" > "$OUT/$name.json"; }
case "$stage" in tests|all) python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/tests.txt";; esac
case "$stage" in megrez2|all)
  run megrez2 bench --shape megrez2-3x7b-a3b --device cuda --dtype bfloat16 --batch 1 8 32 64 --prompt 128 1024 --output 128;;
esac
case "$stage" in megrez3b|all)
  run megrez3b bench --shape megrez-3b --device cuda --dtype bfloat16 --batch 1 8 32 64 --prompt 128 1024 --output 128 \
      --hf-baseline;;
esac
case "$stage" in offload|all)
  run offload bench-offload --shape megrez2-3x7b-a3b --device cuda --dtype bfloat16 \
      --budgets 5GiB 6GiB 8GiB 10GiB 12GiB --batch 1 8 --output 64;;
esac
