#!/usr/bin/env bash
# Packed-document attention on one GPU in one call: the GPU tests of tests/test_attention.py, then `jaxscale bench`
# with data.document_masking on and off at the Llama 3.2 1B shape (8 x 2048), 1B at 2 x 8192 and the 3B shape
# (4 x 2048, remat dots), then, with the time left, experiments/attention_kernels.py. Run from the checkout:
#   OUT=/tmp/attention bash experiments/attention_gpu.sh
# Every step has a timeout taken from one deadline (BUDGET_S, default 560 s), so the summary always prints.
set -u
OUT=${OUT:-/tmp/attention_gpu}
BUDGET=${BUDGET_S:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda JAXSCALE_CACHE=${JAXSCALE_CACHE:-/tmp/jaxscale_cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
date -u +%FT%TZ

left() { echo $((BUDGET - SECONDS)); }
step() {  # NAME CAP COMMAND...: runs with the smaller of CAP and the time left, logs to $OUT/NAME.log
  local name=$1 cap=$2; shift 2
  local limit=$(( cap < $(left) ? cap : $(left) ))
  if [ "$limit" -lt 20 ]; then echo "$name skipped: $(left) s left"; return; fi
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? in ${SECONDS} s (cap ${limit} s)"
}

step gpu_tests 100 python -m pytest -q -x tests/test_attention.py -k gpu -s -p no:cacheprovider
tail -6 "$OUT/gpu_tests.log"

LLAMA=(--set model.preset=llama-1b --set model.vocab_size=128256 --set model.tie_embeddings=true
       --windows 3 --steps-per-window 5)
for masking in true false; do
  step "1b-$masking" 110 python -m jaxscale.cli bench "${LLAMA[@]}" --set train.batch_size=8 \
    --set train.scan_unroll=16 --set data.document_masking=$masking --out "$OUT/1b-$masking.json"
done
for masking in true false; do
  step "1b-8k-$masking" 110 python -m jaxscale.cli bench "${LLAMA[@]}" --set model.seq_len=8192 \
    --set train.batch_size=2 --set train.scan_unroll=16 --set data.document_masking=$masking \
    --out "$OUT/1b-8k-$masking.json"
done
for masking in true false; do
  step "3b-$masking" 130 python -m jaxscale.cli bench "${LLAMA[@]}" --set model.d_model=3072 \
    --set model.n_layers=28 --set model.n_heads=24 --set train.batch_size=4 --set train.scan_unroll=28 \
    --set train.remat=dots --set data.document_masking=$masking --out "$OUT/3b-$masking.json"
done
step kernels 150 python experiments/attention_kernels.py --layouts corpus,short256 --tilings t128x64,t128x128
grep "^|" "$OUT/kernels.log"

python - "$OUT" <<'PY'
import json, pathlib, sys
print("| run | masking | attention kernel | tok/s | MFU | step ms | peak memory GB | compile s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ("1b", "1b-8k", "3b"):
    for masking in ("true", "false"):
        path = pathlib.Path(sys.argv[1]) / f"{name}-{masking}.json"
        if not path.exists():
            print(f"| {name} | {masking} | (no result: see {name}-{masking}.log) |")
            continue
        r = json.loads(path.read_text())
        print(f"| {name} | {masking} | {r['attention_kernel']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{r['step_s'] * 1e3:.1f} | {r['peak_memory_gb']:.1f} | {r['compile_s']:.0f} |")
PY
