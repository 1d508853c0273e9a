# Sourced by the one-call GPU scripts (attention_gpu.sh, fp8_gpu.sh) after they set OUT and BUDGET: the
# environment, the card and versions printed, GPU_MIB, and `step NAME CAP COMMAND...`, which runs COMMAND with
# the smaller of CAP and the seconds left before BUDGET and logs it to $OUT/NAME.log, so the summary always prints.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda JAXSCALE_CACHE=${JAXSCALE_CACHE:-/tmp/jaxscale_cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
date -u +%FT%TZ
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | tr -dc 0-9)

left() { echo $((BUDGET - SECONDS)); }
step() {
  local name=$1 cap=$2; shift 2
  local limit=$(( cap < $(left) ? cap : $(left) ))
  if [ "$limit" -lt 30 ]; then echo "$name skipped: $(left) s left"; return; fi
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at ${SECONDS} s (cap ${limit} s)"
}
