#!/usr/bin/env bash
# An 8-expert top-2 mixture of experts on the gpt2-350m base against the dense gpt2-350m of equal active
# parameters, on the current GPU (for BENCHMARKS.md; not yet run: written while no GPU was lent).
# Each expert is half the dense MLP's width (model.moe.d_ff=2048), so a token's two experts hold exactly the dense
# model's MLP parameters and MFU counts the same FLOPs per token (active parameters) for all three runs.
# Usage: bash experiments/moe_vs_dense_gpu.sh [OUT_DIR]   (one GPU; prints a table last; BENCH_ARGS: more flags
# for jaxscale bench, e.g. "--windows 3")
set -u
out=${1:-${OUT:-/tmp/moe_vs_dense}}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)" | tee -a "$out/gpu.txt"
moe="--set model.moe.experts=8 --set model.moe.top_k=2 --set model.moe.d_ff=2048"
run() {  # name, extra arguments of jaxscale bench
  local name=$1; shift
  python3 -m jaxscale.cli bench gpt2-350m --set train.batch_size=16 ${BENCH_ARGS:-} "$@" > "$out/$name.log" 2>&1
  grep '^{' "$out/$name.log" | tail -1 > "$out/$name.json" || echo "{\"failed\": \"$name\"}" > "$out/$name.json"
}
run dense
run moe-capacity-1.25 $moe --set model.moe.capacity_factor=1.25
run moe-dropless $moe
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':20} {'tokens/s':>10} {'MFU (active)':>12} {'peak GB':>8}")
for name in ("dense", "moe-capacity-1.25", "moe-dropless"):
    r = json.loads((out / f"{name}.json").read_text() or "{}")
    f = lambda k, p: f"{r[k]:{p}}" if isinstance(r.get(k), (int, float)) else "-"
    print(f"{name:20} {f('tokens_per_s', '10,.0f')} {f('mfu', '12.3f')} {f('peak_memory_gb', '8.1f')}")
PY
