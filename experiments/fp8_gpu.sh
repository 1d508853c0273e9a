#!/usr/bin/env bash
# fp8 matmuls against the default (bf16) on one Hopper GPU in one call (issue 36, item 4): the fp8 tests, a check
# that XLA rewrote the projections into cuBLASLt fp8 GEMMs, then `jaxscale bench` of the Llama 3.2 1B and 3B shapes
# of experiments/attention_gpu.sh (vocab 128,256 tied, packed documents masked) with and without
# --set train.matmul_dtype=fp8. Not yet run. Run from the checkout:
#   OUT=/tmp/fp8 bash experiments/fp8_gpu.sh
# Every step has a timeout taken from one deadline (BUDGET_S, default 560 s), so the summary always prints.
set -u
OUT=${OUT:-/tmp/fp8_gpu}
BUDGET=${BUDGET_S:-560}
source "$(dirname "$0")/gpu_steps.sh"

step tests 120 python -m pytest -q tests/test_fp8.py -m "slow or not slow" -p no:cacheprovider
tail -3 "$OUT/tests.log"

# The fp8 GEMMs in the compiled step of a 2-layer Llama 1B slice: cuBLASLt custom calls taking f8 operands
# (e4m3 x e4m3 forward, e5m2 x e4m3 backward). None means XLA kept bf16 dots and fp8 only adds work.
step gemms 120 python - <<'PY'
import re
from collections import Counter

import jax
from jaxscale.config import load_config
from jaxscale.training import build_trainer
from jaxscale.training.language_model import lm_batch_spec
config = load_config("default", ["model.preset=llama-1b", "model.n_layers=2", "train.batch_size=2",
                                 "train.matmul_dtype=fp8"])
trainer = build_trainer(config, jax.devices()[:1])
batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.data_sharding)
         for k, s in lm_batch_spec(config).items()}
hlo = trainer.train_step.lower(trainer.abstract_state(), batch).compile().as_text().splitlines()
fp8 = [line.split("custom-call(", 1)[1] for line in hlo if 'custom_call_target="__cublas$lt$matmul$f8"' in line]
pairs = Counter(tuple(re.findall(r"(f8e\w+)\[", line)[:2]) for line in fp8)
print(f"{len(fp8)} cuBLASLt fp8 GEMMs, operand dtypes {dict(pairs)}")
print("bf16/f32 GEMMs:", sum('custom_call_target="__cublas$gemm"' in line
                             or 'custom_call_target="__cublas$lt$matmul"' in line for line in hlo))
PY
cat "$OUT/gemms.log"

LLAMA=(--set model.preset=llama-1b --set model.vocab_size=128256 --set model.tie_embeddings=true
       --windows 3 --steps-per-window 5)
bench() {  # NAME CAP MATMUL_DTYPE EXTRA...
  local name=$1 cap=$2 matmul=$3; shift 3
  step "$name" "$cap" python -m jaxscale.cli bench "${LLAMA[@]}" --set train.matmul_dtype="$matmul" "$@" \
    --out "$OUT/$name.json" --force
}
ONE_B=(--set train.batch_size=8 --set train.scan_unroll=16)
if [ "$GPU_MIB" -ge 100000 ]; then REMAT=none; else REMAT=dots; fi
THREE_B=(--set model.d_model=3072 --set model.n_layers=28 --set model.n_heads=24 --set train.batch_size=4
         --set train.scan_unroll=28 --set train.remat=$REMAT)
bench 1b-compute 90 compute "${ONE_B[@]}"
bench 1b-fp8 90 fp8 "${ONE_B[@]}"
bench 3b-compute 110 compute "${THREE_B[@]}"
bench 3b-fp8 110 fp8 "${THREE_B[@]}"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*b-*.json"))}
print("| run | tok/s | MFU (bf16 peak) | step ms | peak memory GB | compile s | final loss | fp8 / compute |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, r in rows.items():
    base = rows.get(name.split("-")[0] + "-compute")
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base else "-"
    print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['step_s'] * 1e3:.1f} | "
          f"{r['peak_memory_gb']:.1f} | {r['compile_s']:.0f} | {r['final_loss']:.4f} | {ratio} |")
PY
