#!/usr/bin/env bash
# jaxscale next to the peers (../shared/peers, copied to .peers/) on the current GPU, same model sizes and batches.
# Usage: bash experiments/gpu_compare.sh [OUT_DIR]   (the device tool: carry .peers). Prints a table last.
set -u
out=${1:-${OUT:-/tmp/gpu_compare}}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" | tee -a "$out/gpu.txt"
run() {  # name, command...
  local name=$1; shift
  "$@" > "$out/$name.log" 2>&1; grep '^{' "$out/$name.log" | tail -1 > "$out/$name.json" || echo "{\"failed\": \"$name\"}" > "$out/$name.json"
}
# The peers warm up for about 10 s, as `jaxscale bench` does on a GPU: clocks settle under the power cap.
for size in "124m 12 768 12 32 160" "350m 24 1024 16 16 120"; do  # ... and the peers' warm-up steps
  set -- $size
  run "torch-$1" python3 .peers/torch_gpt.py --layers $2 --d-model $3 --heads $4 --batch $5 --warmup $6 --steps 60
  run "jaxpeer-$1" python3 .peers/jax_gpt.py --layers $2 --d-model $3 --heads $4 --batch $5 --warmup $6 --steps 60 --attn cudnn --remat none
  run "jaxscale-$1" python3 -m jaxscale.cli bench gpt2-$1 --set train.batch_size=$5 ${JAXSCALE_BENCH_ARGS:-}
done
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'size':6} {'torch tok/s':>12} {'mfu':>6} {'jax peer':>10} {'mfu':>6} {'jaxscale':>10} {'mfu':>6} {'vs torch':>8}")
for size in ("124m", "350m"):
    r = {k: json.loads((out / f"{k}-{size}.json").read_text() or "{}") for k in ("torch", "jaxpeer", "jaxscale")}
    tok = {k: v.get("tokens_per_s") for k, v in r.items()}
    mfu = {k: v.get("mfu") for k, v in r.items()}
    ratio = tok["jaxscale"] / tok["torch"] if tok["jaxscale"] and tok["torch"] else float("nan")
    f = lambda x, p: f"{x:{p}}" if isinstance(x, (int, float)) else "-"
    print(f"{size:6} {f(tok['torch'], '12,.0f')} {f(mfu['torch'], '6.3f')} {f(tok['jaxpeer'], '10,.0f')} "
          f"{f(mfu['jaxpeer'], '6.3f')} {f(tok['jaxscale'], '10,.0f')} {f(mfu['jaxscale'], '6.3f')} {ratio:8.3f}")
PY
