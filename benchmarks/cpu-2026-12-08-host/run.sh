#!/usr/bin/env bash
# Host cost before (a3bbf23: the ops registered from Python) and after (registered in C++), side by side on one
# machine: side_by_side.py in alternating processes, 4 rounds per build at 2 and at 1 intra-op threads; then the
# bench's own host cost (after) and the kernel calls alone. BEFORE_PKG: a3bbf23's wheel installed with
# `pip install --target`.
set -euo pipefail
PY=${PY:-python}
OUT=$(cd "$(dirname "$0")" && pwd)
cd /tmp  # import the installed packages, not a checkout
: > "$OUT/side_by_side.jsonl"
for threads in 2 1; do
  for round in 1 2 3 4; do
    THREADS=$threads PYTHONPATH="$BEFORE_PKG" "$PY" "$OUT/side_by_side.py" before >> "$OUT/side_by_side.jsonl"
    THREADS=$threads "$PY" "$OUT/side_by_side.py" after >> "$OUT/side_by_side.jsonl"
  done
done
"$PY" -m shared_prefix.bench --preset cpu-small --variants shared_prefix --steps 3 --out "$OUT/bench-small"
"$PY" -m shared_prefix.bench --config 1152x64x4x8 --system 1024 --variants shared_prefix --steps 3 \
  --out "$OUT/bench-system"
"$PY" -m shared_prefix.bench --config 256x256x8x4 --branches 2 --variants shared_prefix --steps 3 \
  --out "$OUT/bench-branches"
"$PY" "$OUT/kernel_calls.py" > "$OUT/kernel_calls.txt"
