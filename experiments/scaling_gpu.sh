#!/usr/bin/env bash
# The GPU scaling-law sweep in one command: `scaling sweep --preset gpu` (5 sizes x 3 budgets, byte tokens) with
# one run per GPU at a time, then `scaling fit`. The data is this machine's own Python sources
# (experiments/code_corpus.py), so nothing is downloaded.
#
# Usage, from anywhere: bash experiments/scaling_gpu.sh OUT_DIR [more `jaxscale scaling sweep` arguments]
#   e.g. ... OUT_DIR --dry-run (print the plan only), or ... OUT_DIR --sizes 256x4,384x6 --tokens 1e6,2e6
# Environment: PYTHON (default python3), WORKERS (default: the GPU count, 1 without GPUs), CORPUS_MAX_BYTES
# (default 400e6: the corpus's cap in bytes of text), SWEEP_TIME_LIMIT (seconds; see below).
# Writes under OUT_DIR: code.jsonl (the corpus; kept and reused), cache/ (the tokenized corpus), runs/<run>/
# (each run's sweep.log, metrics.jsonl, scaling.json), scaling_gpu.log (all of this script's output),
# scaling_gpu_fit.png. Rerunning continues an interrupted sweep: finished runs are skipped.
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: bash experiments/scaling_gpu.sh OUT_DIR [jaxscale scaling sweep arguments]" >&2
  exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)  # absolute: the corpus path is part of the data cache key and of every run's config
shift
cd "$repo"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
# The data cache's location is not a config key: jaxscale reads $JAXSCALE_CACHE. The sweep's parent process
# tokenizes the corpus into it once before starting the workers, which then only read it.
export JAXSCALE_CACHE=$out/cache
log=$out/scaling_gpu.log

step() {  # echo a command, run it, and keep its output in the log; a failure stops the script (pipefail)
  echo "+ $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
}

if [[ -z ${WORKERS:-} ]]; then
  WORKERS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # a scheduler's allocation: only those GPUs
    WORKERS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  fi
  if (( WORKERS < 1 )); then
    echo "no GPU found (nvidia-smi -L); training one run at a time" | tee -a "$log"
    WORKERS=1
  fi
fi
echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $WORKERS workers, output in $out" | tee -a "$log"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>&1 | tee -a "$log" || true
fi
step "$python" -c "import jax; print('jax', jax.__version__, jax.devices())"

if [[ ! -s $out/code.jsonl ]]; then  # written under a temporary name and renamed: present means complete
  step "$python" experiments/code_corpus.py "$out/code.jsonl" --max-bytes "${CORPUS_MAX_BYTES:-400e6}"
fi
size=$(stat -c %s "$out/code.jsonl")
if (( size < 120000000 )); then  # JSON escapes add a few %: this is ~115M bytes of text, 5% held out
  echo "WARNING: $out/code.jsonl is $size bytes; the preset's 100M-token runs need ~110M bytes of text" \
       "(training data) or they repeat data, which bends the fitted law" | tee -a "$log"
fi

dry_run=0
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then dry_run=1; fi
done
# SWEEP_TIME_LIMIT (seconds): stop the sweep then (SIGTERM: running runs save a checkpoint; exit 75) so that a
# lease or job limit cannot kill it mid-save; rerunning the script continues from there.
limit=()
if [[ -n ${SWEEP_TIME_LIMIT:-} ]]; then limit=(timeout -s TERM "$SWEEP_TIME_LIMIT"); fi
step "${limit[@]}" "$python" -m jaxscale.cli scaling sweep --preset gpu --workers "$WORKERS" --out "$out/runs" \
  --set "data.source=$out/code.jsonl" "$@"
if (( dry_run )); then
  exit 0
fi
step "$python" -m jaxscale.cli scaling fit "$out/runs" --holdout --bootstrap 100 --png "$out/scaling_gpu_fit.png"
echo "=== done in ${SECONDS} s; fit: $out/scaling_gpu_fit.png, log: $log" | tee -a "$log"
