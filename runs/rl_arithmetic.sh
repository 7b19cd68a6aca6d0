#!/usr/bin/env bash
# RLVR on the bundled model (megrez2-tiny-chat): the times table in its chat format
# ("What is 7 × 5?" -> "7 × 5 = 35."), rewarded when the final integer is right.
# Held-out accuracy before and after (greedy, and 4 samples at T=1), then `megrez train rl`
# with the report's recipe for at most 35 minutes on CPU. One thread by default, so the
# machine stays usable for others (THREADS=2 to use both cores of a 2-core machine).
#
#   bash runs/rl_arithmetic.sh          # results in runs-out/rl-arith
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-runs-out/rl-arith}
THREADS=${THREADS:-1}
BASE=${BASE:-src/megrez/assets/megrez2-tiny-chat}
TEST=(--task arithmetic --task-option split=test --task-option n=500 --task-option 'ops=*' --threads "$THREADS"
      --no-progress)

evaluate() {  # MODEL NAME
  python -m megrez.cli eval "${TEST[@]}" --model "$1" --out "$OUT/eval-$2-greedy"
  python -m megrez.cli eval "${TEST[@]}" --model "$1" --samples 4 --temperature 1.0 --pass-k 1 4 \
      --out "$OUT/eval-$2-t1"
}

[ -f "$OUT/eval-before-t1/arithmetic.summary.json" ] || evaluate "$BASE" before
python -m megrez.cli train rl --init "$BASE" --task arithmetic \
    --task-options '{"split": "train", "n": 800, "ops": "*"}' \
    --eval-task-options '{"split": "test", "n": 300, "ops": "*"}' \
    --out "$OUT/rl" --steps 400 --time-limit-minutes 35 --prompts-per-step 16 --group-size 8 \
    --filter-samples 4 --zero-pass-fraction 0.5 --ppo-epochs 1 --minibatches 2 --lr 5e-5 --clip-eps 0.2 \
    --bias-update-rate 1e-3 --eval-every 25 --save-every 25 --threads "$THREADS" --export-dtype bfloat16 \
    --no-progress
evaluate "$OUT/rl/final" after
