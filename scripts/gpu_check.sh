#!/usr/bin/env bash
# One device check on a GPU machine: the GPU tests, `python -m shared_prefix.bench --preset gpu` (Qwen2.5-0.5B
# shapes), the same bench with Qwen2.5-1.5B shapes (a larger model: a step less bound by the host's op issue), and a
# profile of one step at 4096x512x8x1. Both benches put `shared_prefix` (calls 1 and 3 as one FA2 call wherever
# the prefix does not go to cuDNN) beside `shared_prefix_split` (DESIGN's three calls, the default until 2026-11-27);
# the first also `shared_prefix_fused` (one FA2 call even where "auto" gives the prefix to cuDNN: 8k and 16k).
# Run from the repo root with the wheels in .whl/ (our abi3 wheel built on the CPU machine, plus pure-Python or
# abi3 wheels the image lacks). Results land in $OUT as 8 files, the most a device call returns: gpu.txt (card,
# versions, the benches' logs), gpu_tests.log, bench/results.{jsonl,md,png}, bench-1.5b/results.{jsonl,md} and
# profiles.txt. The tree travels without .git: pass SHARED_PREFIX_COMMIT so the results name the commit.
# Timeouts default to 110 + 200 + 170 + 60 s, inside one 600 s device call (run 8: 44 tests in 33-48 s, now 60;
# a 5-variant bench about 120 s, now 7; the 1.5B bench takes 3 timed rounds); each sends SIGINT first (then KILL
# 5 s later), so pytest prints its summary and the bench writes the rounds it completed. With the install and
# import checks the worst case is about 570 s.
# Of the kernel-forcing variants only shared_prefix_cudnn_views (every call on copy-free cuDNN: the GPU-time winner
# at 4096x512x8x1, where the default rule keeps FA2) runs by default, last and only if its GPU tests passed; the
# other kernel comparisons and the cuDNN layout diagnosis (scripts/gpu_cudnn_diag.py) are recorded (BENCHMARKS.md,
# runs 4, 6 and 7).
# Preparing .whl here (the image has torch 2.11 but transformers 5.17): `make wheel` then copy dist/*.whl, and
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl
# transformers==5.10.4 tokenizers==0.22.2 prefix-grouper==0.0.1.post1` (see the device README).
set -u
OUT=${OUT:-/tmp/sp-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
# The freshest Python sources from the tree, with the extension from the wheel.
cp /tmp/site/shared_prefix/_core.abi3.so python/shared_prefix/
export PYTHONPATH="$PWD/python:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, shared_prefix; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout -s INT -k 5 "${TEST_TIMEOUT:-110}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
VARIANTS=${VARIANTS:-baseline,packed_causal,shared_prefix,shared_prefix_split,shared_prefix_fused,flex,shared_prefix_cudnn_views}
# The all-cuDNN variant (last) joins the bench only if the GPU tests passed: a CUDA error in it (an illegal memory
# access poisons the context) would take every later measurement of the run with it. The default rule's cuDNN calls
# run the same copy-free path; a failure there shows in the tests and in shared_prefix's agreement column.
if grep -qE "FAILED.*cudnn_views|cudnn_views.*(FAILED|ERROR)|CUDA error|illegal memory" "$OUT/gpu_tests.log" || ! grep -q " passed" "$OUT/gpu_tests.log"; then
  VARIANTS=${VARIANTS//,shared_prefix_cudnn_views/}
  echo "bench without shared_prefix_cudnn_views (its GPU tests did not pass)" | tee -a "$OUT/gpu.txt"
fi
timeout -s INT -k 5 "${BENCH_TIMEOUT:-200}" python3 -m shared_prefix.bench --preset gpu --variants "$VARIANTS" --out "$OUT/bench" \
  ${BENCH_ARGS:-} 2>&1 \
  | grep -v "step/s\]\|s/step\]" | tee -a "$OUT/gpu.txt" | tail -30
timeout -s INT -k 5 "${BENCH15_TIMEOUT:-170}" python3 -m shared_prefix.bench --preset gpu --model qwen2.5-1.5b --steps 3 \
  --variants "${VARIANTS15:-baseline,packed_causal,shared_prefix,shared_prefix_split}" --out "$OUT/bench-1.5b" 2>&1 \
  | grep -v "step/s\]\|s/step\]" | tee -a "$OUT/gpu.txt" | tail -20
rm -f "$OUT/bench-1.5b/results.png"  # a ninth file would be one too many; the table has the figures
timeout -s INT -k 5 "${PROFILE_TIMEOUT:-60}" python3 scripts/gpu_profile.py "$OUT" 4096x512x8x1 2>&1 \
  | grep -A6 " ms (median" | tail -40
