#!/usr/bin/env bash
# fp8 against the default matmuls over a long run (issue 36, item 4: the loss within 1% of bf16 after 2,000
# steps): two `jaxscale train` runs of the same experiment, seed and built-in corpus, the second with
# train.matmul_dtype=fp8; `jaxscale plot` overlays their curves and the summary prints the mean training loss of
# the last 10% of steps of each and their ratio. Default: the Llama 3.2 1B shape at 8 x 1024, 2,000 steps.
# Run from the checkout (on a Hopper GPU; on a CPU, fp8 is emulated and this only tests the plumbing):
#   OUT=/tmp/fp8_curve bash experiments/fp8_curve.sh
# Knobs: EXPERIMENT (default llama-1b), STEPS (2000), EXTRA (more --set flags, e.g. "--set model.seq_len=2048"),
# MATMULS (default "compute fp8": which runs to train; one per device call where both do not fit in one, the
# summary then compares what $OUT holds).
set -eu
OUT=${OUT:-/tmp/fp8_curve}
EXPERIMENT=${EXPERIMENT:-llama-1b}
STEPS=${STEPS:-2000}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
mkdir -p "$OUT"
for matmul in ${MATMULS:-compute fp8}; do
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  python -m jaxscale.cli train "$EXPERIMENT" --set model.seq_len=1024 --set train.steps="$STEPS" \
    --set train.log_every=10 --set train.eval_every=0 --set train.progress=false --set checkpoint.every_steps=0 \
    --set train.matmul_dtype="$matmul" --set run_dir="$OUT/$matmul" ${EXTRA:-} > "$OUT/$matmul.log" 2>&1
  tail -1 "$OUT/$matmul.log"
done
[ -d "$OUT/compute" ] && [ -d "$OUT/fp8" ] || { echo "one of $OUT/compute, $OUT/fp8 is missing"; exit 0; }
python -m jaxscale.cli plot "$OUT/compute" "$OUT/fp8" --out "$OUT/curves.png"
python - "$OUT" <<'PY'
import sys
from pathlib import Path

from jaxscale.training.events import read_metrics

out = Path(sys.argv[1])
means = {}
for name in ("compute", "fp8"):
    losses = [r["loss"] for r in read_metrics(out / name / "metrics.jsonl") if "loss" in r]
    tail = losses[-max(1, len(losses) // 10):]
    means[name] = sum(tail) / len(tail)
    print(f"{name}: {len(losses)} logged steps, mean loss of the last {len(tail)}: {means[name]:.4f}")
print(f"fp8 / compute: {means['fp8'] / means['compute']:.4f} (goal: within 1%)")
PY
