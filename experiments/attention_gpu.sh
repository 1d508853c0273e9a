#!/usr/bin/env bash
# Packed-document attention on one GPU in one call: the GPU tests of tests/test_attention.py, then `jaxscale bench`
# of Llama 3.2 shapes with data.document_masking off (cuDNN, no segment ids) and on, through each segment-aware
# kernel (model.attention=pallas: the Triton kernel; cudnn: cuDNN's packed layout): 1B at 8 x 2048, 1B at
# 2 x 8192, 3B at 4 x 2048 (remat dots where the card has under 100 GB), then, with the time left,
# experiments/attention_kernels.py. Run from the checkout:
#   OUT=/tmp/attention bash experiments/attention_gpu.sh
# Every step has a timeout taken from one deadline (BUDGET_S, default 560 s), so the summary always prints. The
# faster masked kernel at 1B is written to $BEST_FILE (default /tmp/best_attention) for a later call to use.
# SHAPES (default "1b 8k 3b") picks the benches; KERNELS (default "pallas cudnn") the masked kernels at 1B and 8k;
# KERNELS_3B (default: the faster at 1B) the masked kernels at 3B; REMAT_3B (default: none on cards of 100 GB or
# more, else dots) its remat policy; TESTS=0 skips the GPU tests (TEST_FILTER: their -k, default gpu); SWEEP=0
# the kernel microbenchmark; PROFILE (run names, e.g. "1b-off 1b-pallas") traces 3 steps of those benches and
# prints where their device time went.
set -u
OUT=${OUT:-/tmp/attention_gpu}
BUDGET=${BUDGET_S:-560}
BEST_FILE=${BEST_FILE:-/tmp/best_attention}
source "$(dirname "$0")/gpu_steps.sh"

SHAPES=${SHAPES:-1b 8k 3b}
KERNELS=${KERNELS:-pallas cudnn}
has() { [[ " $1 " == *" $2 "* ]]; }
[ "${TESTS:-1}" = 1 ] && step gpu_tests 100 python -m pytest -q tests/test_attention.py -k "${TEST_FILTER:-gpu}" -p no:cacheprovider
[ "${TESTS:-1}" = 1 ] && tail -4 "$OUT/gpu_tests.log"

LLAMA=(--set model.preset=llama-1b --set model.vocab_size=128256 --set model.tie_embeddings=true
       --windows 3 --steps-per-window 5)
bench() {  # NAME CAP MASKING ATTENTION EXTRA...
  local name=$1 cap=$2 masking=$3 kernel=$4; shift 4
  local profile=()
  has "${PROFILE:-}" "$name" && profile=(--profile "/tmp/profile-$name" --profile-steps 3)
  step "$name" "$cap" python -m jaxscale.cli bench "${LLAMA[@]}" --set data.document_masking="$masking" \
    --set model.attention="$kernel" "$@" "${profile[@]}" --out "$OUT/$name.json"
}
ONE_B=(--set train.batch_size=8 --set train.scan_unroll=16)
EIGHT_K=(--set model.seq_len=8192 --set train.batch_size=2 --set train.scan_unroll=16)
if has "$SHAPES" 1b; then
  bench 1b-off 90 false auto "${ONE_B[@]}"
  for kernel in $KERNELS; do bench "1b-$kernel" 90 true "$kernel" "${ONE_B[@]}"; done
fi
python - "$OUT" "$BEST_FILE" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rates = {k: json.loads((out / f"1b-{k}.json").read_text())["tokens_per_s"]
         for k in ("pallas", "cudnn") if (out / f"1b-{k}.json").exists()}
best = max(rates, key=rates.get) if rates else "pallas"
pathlib.Path(sys.argv[2]).write_text(best)
print("faster masked kernel at 1B:", best, rates)
PY
BEST=$(cat "$BEST_FILE")
if has "$SHAPES" 8k; then
  bench 8k-off 100 false auto "${EIGHT_K[@]}"
  for kernel in $KERNELS; do bench "8k-$kernel" 100 true "$kernel" "${EIGHT_K[@]}"; done
fi
if [ "$GPU_MIB" -ge 100000 ]; then REMAT=${REMAT_3B:-none}; else REMAT=${REMAT_3B:-dots}; fi
THREE_B=(--set model.d_model=3072 --set model.n_layers=28 --set model.n_heads=24 --set train.batch_size=4
         --set train.scan_unroll=28 --set train.remat=$REMAT)
if has "$SHAPES" 3b; then
  bench 3b-off 110 false auto "${THREE_B[@]}"
  for kernel in ${KERNELS_3B:-$BEST}; do bench "3b-$kernel" 110 true "$kernel" "${THREE_B[@]}"; done
fi
if [ "${SWEEP:-1}" = 1 ]; then
  step kernels 120 python experiments/attention_kernels.py --layouts corpus --tilings t128x64 --shapes 1b-2k,1b-8k
  grep "^|" "$OUT/kernels.log"
fi

[ -n "${PROFILE:-}" ] && grep -A8 "ms per step from the first kernel" "$OUT"/*.log | sed "s|^$OUT/||" | cut -c1-170
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | masking | attention kernel | tok/s | MFU | step ms | peak memory GB | compile s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for path in sorted(out.glob("*-*.json")):
    r = json.loads(path.read_text())
    print(f"| {path.stem} | {r['document_masking']} | {r['attention_kernel']} | {r['tokens_per_s']:,.0f} | "
          f"{r['mfu']:.1%} | {r['step_s'] * 1e3:.1f} | {r['peak_memory_gb']:.1f} | {r['compile_s']:.0f} |")
PY
