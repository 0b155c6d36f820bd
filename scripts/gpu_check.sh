#!/usr/bin/env bash
# One device check on a GPU machine, in order of importance (a device call returns what it wrote before a timeout).
#
# Default run (about 9 minutes at most, within one 600 s device call):
# 1. the GPU tests (tests/test_cuda.py: every kernel and executor path against fp32/fp64 references, prefix trees,
#    the 32-case fuzz of random ragged trees, all under set_sync_debug_mode("error") where they say so);
# 2. `python -m shared_prefix.bench --preset gpu` (Qwen2.5-0.5B shapes at 4k/8k/16k prompts), fixed shapes:
#    the baseline, `packed_causal` (SDPA: cuDNN on Hopper), `packed_causal_fa2`, ours and flex, side by side, with
#    GPU busy times and the host-cost proxy;
# 3. the same with `--vary` (a new prompt length every step, as in training), without the baseline: ours (first, so
#    the agreement columns are against it) beside `packed_causal`, `packed_causal_fa2` and flex, whose recompiles
#    and block-mask builds fall in its timed steps;
# 4. a whole GRPO trainer step (`python -m shared_prefix.bench.trainer_step`): TRL's GRPOTrainer against
#    SharedPrefixGRPOTrainer on a 0.5B-shaped model, generation by transformers, the step split into generation,
#    log-probs, loss forward, backward and the rest (beta 0.04, so the reference model's log-probs are a part too).
# MODE=big instead runs the larger shapes (at most 5 minutes): Qwen2.5-1.5B and a Qwen2.5-7B shape at 4k and 8k
# prompts, baseline / packed_causal / ours (LAYERS7B=N runs the 7B shape with N layers where memory forces it).
# Optional in the default run, each adding its table to gpu.txt: BUCKETED=1 (the experimental cuDNN bucketing under
# --vary, 60 s), AVOID=1 (TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, 70 s), PROFILE=1 (scripts/gpu_profile.py, one
# profiled step at 4k, 60 s).
#
# Run from the repo root with the wheels in .whl/: our abi3 wheel built on the CPU machine (`make wheel`, then copy
# dist/*.whl) and the pure-Python wheels the image lacks or holds at another version:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#     transformers==5.10.4 tokenizers==0.22.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Results land in $OUT, at most 8 files (what a device call returns): gpu.txt (card, versions, every log and
# table), gpu_tests.log, bench/results.{jsonl,md}, bench-vary/results.{jsonl,md}, trainer/trainer_step.{json,md}
# (MODE=big: gpu.txt, big-1.5b/ and big-7b/results.{jsonl,md}). The tree travels without .git: pass
# SHARED_PREFIX_COMMIT so the results name the commit. Each step has its own timeout (SIGINT first, then KILL 5 s
# later), so pytest prints its summary and the benches write what they measured.
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
quiet() { grep -v "step/s\]\|s/step\]"; }

if [ "${MODE:-}" = big ]; then
  for model in qwen2.5-1.5b qwen2.5-7b; do
    layers="" limit=100
    if [ "$model" = qwen2.5-7b ]; then
      limit=200  # six steps per variant; at 8k prompts the 7B baseline forwards 67,584 tokens a step
      [ -n "${LAYERS7B:-}" ] && layers="--layers $LAYERS7B"
    fi
    timeout -s INT -k 5 "$limit" python3 -m shared_prefix.bench --preset gpu --model "$model" $layers \
      --steps 3 --config 4096x512x8x1 --config 8192x256x8x1 --variants baseline,packed_causal,shared_prefix \
      --no-host-cost --out "/tmp/big-${model#qwen2.5-}" 2>&1 | quiet | tee -a "$OUT/gpu.txt" | tail -8
    mkdir -p "$OUT/big-${model#qwen2.5-}"
    cp "/tmp/big-${model#qwen2.5-}"/results.{jsonl,md} "$OUT/big-${model#qwen2.5-}/" 2>/dev/null
  done
  exit 0
fi

timeout -s INT -k 5 "${TEST_TIMEOUT:-130}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
timeout -s INT -k 5 "${BENCH_TIMEOUT:-150}" python3 -m shared_prefix.bench --preset gpu --out "$OUT/bench" \
  --variants "${VARIANTS:-baseline,packed_causal,packed_causal_fa2,shared_prefix,flex}" ${BENCH_ARGS:-} 2>&1 \
  | quiet | tee -a "$OUT/gpu.txt" | tail -30
timeout -s INT -k 5 "${VARY_TIMEOUT:-140}" python3 -m shared_prefix.bench --preset gpu --vary --steps 3 \
  --variants "${VARIANTS_VARY:-shared_prefix,packed_causal,packed_causal_fa2,flex}" --no-host-cost \
  --out "$OUT/bench-vary" 2>&1 | quiet | tee -a "$OUT/gpu.txt" | tail -20
rm -f "$OUT/bench/results.png" "$OUT/bench-vary/results.png"  # the tables have the figures; 8 files at most
timeout -s INT -k 5 "${TRAINER_TIMEOUT:-110}" python3 -m shared_prefix.bench.trainer_step --model qwen2.5-0.5b \
  --prompt-tokens 2048 --completion-tokens 256 --group 8 --prompts 2 --steps 2 --grad-ckpt --beta 0.04 \
  --out "$OUT/trainer" \
  2>&1 | tee -a "$OUT/gpu.txt" | tail -20
# The bucketed variant in a process of its own (the shape counts and cuDNN's graph cache are process-wide),
# beside ours' default, at the configs long enough for cuDNN; its table goes to gpu.txt.
if [ -n "${BUCKETED:-}" ]; then
  timeout -s INT -k 5 60 python3 -m shared_prefix.bench --preset gpu --vary --steps 3 --no-host-cost \
    --config 8200x256x16x1 --config 16400x1024x8x1 --variants shared_prefix_cudnn_bucketed,shared_prefix \
    --out /tmp/bench-bucketed 2>&1 | quiet | sed 's/^/[BUCKETED] /' | tee -a "$OUT/gpu.txt" | tail -8
fi
# PyTorch's experimental TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (process-wide, hence its own process): the previous
# rule and the proxy, varying shapes, 8k and 16k.
if [ -n "${AVOID:-}" ]; then
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 timeout -s INT -k 5 70 python3 -m shared_prefix.bench --preset gpu --vary \
    --steps 3 --no-host-cost --config 8192x256x16x1 --config 16384x1024x8x1 \
    --variants shared_prefix,shared_prefix_eager_cudnn,packed_causal --out /tmp/bench-avoid-recompile 2>&1 \
    | quiet | sed 's/^/[AVOID_RECOMPILE=1] /' | tee -a "$OUT/gpu.txt" | tail -8
fi
if [ -n "${PROFILE:-}" ]; then
  timeout -s INT -k 5 60 python3 scripts/gpu_profile.py /tmp/profile 4096x512x8x1 >/dev/null 2>&1
  cat /tmp/profile/profiles.txt >> "$OUT/gpu.txt"
fi
