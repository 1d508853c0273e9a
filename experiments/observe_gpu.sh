#!/usr/bin/env bash
# Observing a GPU run in one call (not run yet: the device budget was spent when this was written): gpt2-124m on
# one GPU for 300 steps with TensorBoard events and a trace of steps 200-204 (whose summary names cuBLAS / cuDNN
# kernels and their shares), SIGKILLed after the checkpoint at step 100 and resumed (goodput with lost work and a
# restart on a GPU), then `jaxscale report`; with two GPUs, a 2-process run for straggler windows. Run from the
# checkout:
#   OUT=/tmp/observe bash experiments/observe_gpu.sh
set -u
OUT=${OUT:-/tmp/observe_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda JAXSCALE_CACHE=${JAXSCALE_CACHE:-/tmp/jaxscale_cache}
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
date -u +%FT%TZ

RUN=(gpt2-124m --set run_dir="$OUT/run" --set train.steps=300 --set train.progress=false
     --set checkpoint.every_steps=100 --set tracking.writers=[jsonl,tensorboard] --set profile.steps=200:205)
timeout -k 5 300 jaxscale train "${RUN[@]}" > "$OUT/first.log" 2>&1 &
PID=$!
until grep -q '"step": 1[2-9][0-9], "loss"' "$OUT/run/metrics.jsonl" 2>/dev/null || ! kill -0 $PID 2>/dev/null; do
  sleep 1
done
kill -9 $PID; wait $PID
timeout -k 5 300 jaxscale train "${RUN[@]}" > "$OUT/resumed.log" 2>&1
echo "resumed rc=$?"
grep -A12 "profile of steps" "$OUT/resumed.log"
grep "goodput" "$OUT/resumed.log"
jaxscale report "$OUT/run"

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout -k 5 300 jaxscale train gpt2-124m --num-processes 2 --set run_dir="$OUT/two" --set train.steps=200 \
    --set train.progress=false --set stragglers.every=20 > "$OUT/two.log" 2>&1
  echo "two processes rc=$?"
  jaxscale report "$OUT/two"
fi
