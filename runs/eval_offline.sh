#!/usr/bin/env bash
# `megrez eval` over every task set available offline, on the bundled model and on a random
# checkpoint of the same shape family (`megrez create-tiny`), one thread, answers capped at
# 96 tokens. Needs the eval extras and lm-eval's task files:
#   pip install -e '.[eval]' && pip install --no-deps lm-eval
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-runs-out/eval-offline}
THREADS=${THREADS:-1}
RANDOM_CKPT=$OUT/random-megrez2
[ -f "$RANDOM_CKPT/config.json" ] || python -m megrez.cli create-tiny "$RANDOM_CKPT" --arch moe --force
for model in bundled random; do
  args=(--threads "$THREADS" --max-tokens 96 --no-progress --out "$OUT/$model")
  [ "$model" = random ] && args+=(--model "$RANDOM_CKPT")
  # --task-option applies to every --task of a command: arithmetic's pool size on its own.
  python -m megrez.cli eval "${args[@]}" --task arithmetic --task-option n=200 > "$OUT/$model.jsonl"
  python -m megrez.cli eval "${args[@]}" --task gsm8k-sample --task mmlu-dev --task ifeval >> "$OUT/$model.jsonl"
  python -m megrez.cli eval "${args[@]}" --task humaneval --samples 1 >> "$OUT/$model.jsonl"
done
