#!/usr/bin/env bash
# One device check on a GPU machine, in order of importance (a device call returns what it wrote before a timeout):
# 1. the GPU tests (tests/test_cuda.py);
# 2. `python -m shared_prefix.bench --preset gpu` (Qwen2.5-0.5B shapes), the same shapes every step (steady state):
#    `shared_prefix` (calls 1 and 3 as one FA2 call wherever the prefix does not go to cuDNN) beside
#    `shared_prefix_split` (DESIGN's three calls), the baseline, the proxy (SDPA picks cuDNN for it), the proxy held
#    to FA2 (`packed_causal_fa2`: how much of our gap to the proxy is FA2's) and flex;
# 3. the same with `--vary` (a new prompt length every step, as GRPO batches have: what per-shape costs such as
#    cuDNN's graph builds add to a step): `shared_prefix` (default: cuDNN only for shapes seen in 8 plans, so FA2
#    here) beside `shared_prefix_eager_cudnn` (cuDNN for every long one-batch call at once) and the proxy on SDPA's
#    choice (cuDNN: it pays the builds too, as stock packed training would) and on FA2; flex is left out (it recompiles for new shapes);
# 4. `shared_prefix_cudnn_bucketed` (experimental: the causal self calls padded to multiples of 512 tokens so that
#    prompt lengths in one bucket share a cuDNN graph) beside `shared_prefix`, varying, in a process of its own
#    (shape counts and cuDNN's graph cache are process-wide), at P = 8200 and 16400: every step's prompts (P, P + 8,
#    …) are padded into one bucket (8704 / 16896 rows). The variant takes cuDNN for a bucket seen in one earlier
#    plan, so its first step (the agreement check) runs FA2, its peak-memory step builds the bucket's graphs on the
#    padded operands, and its median is the padded cuDNN path once built (the cross call, a new length every step,
#    stays on FA2); the padded path's correctness is `test_cudnn_on_padded_self_calls`'s.
# 5. optional (AVOID=1, 70 s more): the previous rule and the proxy, varying, 8k and 16k, under PyTorch's
#    experimental TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (its own process: the variable is process-wide), with
#    `shared_prefix` (FA2 on fresh shapes, so untouched by it) first as the reference for the agreement columns.
# Run from the repo root with the wheels in .whl/ (our abi3 wheel built on the CPU machine, plus pure-Python or
# abi3 wheels the image lacks). Results land in $OUT as 7 files (a device call returns at most 8): gpu.txt (card,
# versions, every bench's log and table; 4 and 5 only there), gpu_tests.log, bench/results.{jsonl,md,png} and
# bench-vary/results.{jsonl,md}. The tree travels without .git: pass SHARED_PREFIX_COMMIT so the results name the
# commit. Timeouts default to 110 + 160 + 120 + 60 s inside one 600 s device call; each sends SIGINT first (then
# KILL 5 s later), so pytest prints its summary and the bench writes the rounds it completed. With the install and
# import checks the worst case is about 490 s. Optional: AVOID=1 (step 5, 70 s more), BENCH15=1 (the 1.5B-shape
# bench, 170 s more), PROFILE=1 (profiles.txt: one profiled step at 4k, 60 s more).
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
cp /tmp/site/shared_prefix/_core.abi3.so /tmp/site/shared_prefix/_build_info.py python/shared_prefix/
export PYTHONPATH="$PWD/python:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, shared_prefix; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout -s INT -k 5 "${TEST_TIMEOUT:-110}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
timeout -s INT -k 5 "${BENCH_TIMEOUT:-160}" python3 -m shared_prefix.bench --preset gpu --out "$OUT/bench" \
  --variants "${VARIANTS:-baseline,packed_causal,packed_causal_fa2,shared_prefix,shared_prefix_split,flex}" \
  ${BENCH_ARGS:-} 2>&1 | grep -v "step/s\]\|s/step\]" | tee -a "$OUT/gpu.txt" | tail -30
timeout -s INT -k 5 "${VARY_TIMEOUT:-120}" python3 -m shared_prefix.bench --preset gpu --vary --steps 3 \
  --variants "${VARIANTS_VARY:-baseline,packed_causal,packed_causal_fa2,shared_prefix,shared_prefix_eager_cudnn}" \
  --out "$OUT/bench-vary" 2>&1 | grep -v "step/s\]\|s/step\]" | tee -a "$OUT/gpu.txt" | tail -20
rm -f "$OUT/bench-vary/results.png"  # a ninth file would be one too many; the table has the figures
# The bucketed variant in a process of its own (the shape counts and cuDNN's graph cache are process-wide: after
# shared_prefix_eager_cudnn it would find its cross-call graphs built), first, beside ours' default (FA2 here), at
# the configs long enough for cuDNN; its table goes to gpu.txt.
timeout -s INT -k 5 "${BUCKET_TIMEOUT:-60}" python3 -m shared_prefix.bench --preset gpu --vary --steps 3 \
  --config 8200x256x16x1 --config 16400x1024x8x1 --variants shared_prefix_cudnn_bucketed,shared_prefix \
  --out /tmp/bench-bucketed 2>&1 | grep -v "step/s\]\|s/step\]" | sed 's/^/[BUCKETED] /' | tee -a "$OUT/gpu.txt" \
  | tail -8
# PyTorch's experimental TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (cuDNN's ragged path for BSHD layouts, which our
# copy-free views are) may remove the per-shape builds: the previous rule and the proxy, varying shapes, with it set
# (process-wide, hence its own process; its table goes to gpu.txt, its files stay here).
if [ -n "${AVOID:-}" ]; then
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 timeout -s INT -k 5 "${AVOID_TIMEOUT:-70}" python3 -m shared_prefix.bench \
    --preset gpu --vary --steps 3 --config 8192x256x16x1 --config 16384x1024x8x1 \
    --variants shared_prefix,shared_prefix_eager_cudnn,packed_causal --out /tmp/bench-avoid-recompile 2>&1 \
    | grep -v "step/s\]\|s/step\]" | sed 's/^/[AVOID_RECOMPILE=1] /' | tee -a "$OUT/gpu.txt" | tail -8
fi
if [ -n "${PROFILE:-}" ]; then
  timeout -s INT -k 5 60 python3 scripts/gpu_profile.py "$OUT" 4096x512x8x1 2>&1 | grep -A6 " ms (median" | tail -40
fi
if [ -n "${BENCH15:-}" ]; then
  timeout -s INT -k 5 170 python3 -m shared_prefix.bench --preset gpu --model qwen2.5-1.5b --steps 3 \
    --variants baseline,packed_causal,shared_prefix --out /tmp/bench-1.5b 2>&1 \
    | grep -v "step/s\]\|s/step\]" | tee -a "$OUT/gpu.txt" | tail -20
fi
