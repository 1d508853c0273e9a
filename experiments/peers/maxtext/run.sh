#!/usr/bin/env bash
# MaxText 0.2.5 against jaxscale on Llama 3.2 1B and 3B shapes, one GPU, one call.
#
# Run from the jaxscale checkout on the GPU machine, with this folder copied to a git-ignored folder and carried:
#   cp -r experiments/peers/maxtext .carry-maxtext && cp -r ../shared/peers/maxtext/whl .carry-maxtext/
#   (device run, carry [".carry-maxtext"]) bash .carry-maxtext/run.sh
# JAXSCALE_SRC (default: the current folder) is the jaxscale tree that the jaxscale runs import.
# JS_MASKING (default false, as MaxText's synthetic data has no packing): jaxscale's data.document_masking.
# JS_ATTENTION (default auto): jaxscale's model.attention. MT_SKIP_RECIPE_1B=1: MaxText 1B runs `minimal` only.
# Needs on the machine: python3 with jax (CUDA), flax, optax, orbax, numpy, transformers (MaxText imports it),
# pyyaml, tqdm, scipy, matplotlib, tensorstore; everything else MaxText needs comes from mt/whl (installed with
# pip --no-index into $MT_SITE, never into the system) and mt/stub (import shims for pathwaysutils and xprof).
#
# Order (most important first): jaxscale 1B, MaxText 1B (scan_layers=false remat=minimal), MaxText 1B (its GPU
# recipe: remat=minimal_with_context, use_iota_embed, the XLA flags of configs/gpu/a3/*/1vm.sh), jaxscale 3B,
# MaxText 3B (the faster 1B config), then MaxText 3B with the other config if time is left.
# Every run has a timeout taken from one deadline (MT_BUDGET_S, default 530 s for the whole script), so the
# table always prints. Files in $OUT (default /tmp/mt_results): summary.txt and one log per run, 7 at most.
#
# Knobs (environment): OUT, MT_BUDGET_S, PY (python), MT_SITE (install dir), JS3B_REMAT (jaxscale 3B remat:
# default none on >= 100 GB cards, dots on 80 GB cards), MT_STEPS_1B / MT_STEPS_3B (MaxText steps, 40 / 30),
# JS_WINDOWS (jaxscale timed windows of 10 steps, 3), MT_CPU_TEST=1 (tiny shapes on the CPU, to test the script),
# MT_LONG=1 (instead: the 1B shape at 8k, 16k and 32k tokens a row; LONG_SEQS, LONG_TOKENS, JS_LONG_REMAT, MT_REMAT).
set -u
ROOT=$(pwd)
MT=$(cd "$(dirname "$0")" && pwd)
JAXSCALE_SRC=${JAXSCALE_SRC:-$ROOT}
OUTDIR=${OUT:-/tmp/mt_results}
SITE=${MT_SITE:-/tmp/mt_site}
PY=${PY:-python3}
BUDGET=${MT_BUDGET_S:-530}
RESERVE=12     # seconds kept for the summary at the end
MIN_RUN_S=60   # a run that would get less than this is skipped
WORK=/tmp/mt_work
mkdir -p "$OUTDIR" "$WORK"
SUM="$OUTDIR/summary.txt"
: > "$SUM"
say() { echo "$@" | tee -a "$SUM"; }

if [ ! -d "$MT/whl" ] || [ ! -d "$JAXSCALE_SRC/jaxscale" ]; then
  echo "run from the jaxscale checkout, or set JAXSCALE_SRC (now $JAXSCALE_SRC)" >&2; exit 2
fi

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}  # the same for both programs
export JAXSCALE_CACHE=${JAXSCALE_CACHE:-/tmp/jaxscale_cache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

# ---------------------------------------------------------------- machine, versions, install
say "== maxtext peer run.sh $(date -u +%FT%TZ) in $ROOT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader 2>&1 | tee -a "$SUM"
  GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
fi
GPU_MIB=${GPU_MIB:-0}
t=$SECONDS
rm -rf "$SITE"; mkdir -p "$SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "$MT"/whl/*.whl >>"$SUM" 2>&1; then
  say "pip install failed; unpacking the wheels instead"
  for w in "$MT"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || say "could not unpack $w"; done
fi
say "installed $(ls "$MT"/whl/*.whl | wc -l) wheels into $SITE in $((SECONDS - t)) s"
MT_PYTHONPATH="$SITE:$MT/stub"
PYTHONPATH="$MT_PYTHONPATH" DECOUPLE_GCLOUD=TRUE "$PY" - <<'PY' 2>&1 | tee -a "$SUM"
import importlib.metadata as md, sys
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
         "transformers", "torch", "maxtext", "pydantic", "grain", "tokamax", "qwix", "absl-py", "typing_extensions",
         "protobuf", "sentencepiece", "tiktoken", "etils", "tensorstore"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
print("python", sys.version.split()[0], "|", ", ".join(f"{n} {v}" for n in names if (v := version(n))))
PY

# ---------------------------------------------------------------- shapes and settings
# name layers d heads kv head_dim ff vocab seq batch
SHAPE_1B=${SHAPE_1B:-"16 2048 32 8 64 8192 128256 2048 8"}  # layers d heads kv head_dim ff vocab seq batch
SHAPE_3B=${SHAPE_3B:-"28 3072 24 8 128 8192 128256 2048 4"}
MT_STEPS_1B=${MT_STEPS_1B:-40}
MT_STEPS_3B=${MT_STEPS_3B:-30}
JS_WINDOWS=${JS_WINDOWS:-3}
HW=gpu; MT_ATTN=cudnn_flash_jax; JS_EXTRA=()
if [ "${MT_CPU_TEST:-0}" = 1 ]; then  # tiny shapes on the CPU: tests the script, measures nothing
  SHAPE_1B="2 64 4 2 16 128 512 64 2"; SHAPE_3B="3 96 6 2 16 128 512 64 2"
  MT_STEPS_1B=${MT_STEPS_1B_TEST:-12}; MT_STEPS_3B=${MT_STEPS_3B_TEST:-12}; JS_WINDOWS=2
  HW=cpu; MT_ATTN=dot_product; JS_EXTRA=(--steps-per-window 2 --warmup 2)
fi
if [ "$GPU_MIB" -ge 100000 ]; then JS3B_REMAT=${JS3B_REMAT:-none}; else JS3B_REMAT=${JS3B_REMAT:-dots}; fi
say "GPU memory ${GPU_MIB} MiB: jaxscale 3B remat=$JS3B_REMAT; XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"

# The XLA flags of MaxText's own GPU recipes (maxtext/configs/gpu/a3/llama_2_7b/1vm.sh) without --xla_dump_to;
# the collective ones do nothing on one GPU.
RECIPE_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false
 --xla_gpu_enable_command_buffer='' --xla_gpu_enable_highest_priority_async_stream=true
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 --xla_gpu_pipeline_all_gather=on
 --xla_gpu_pipeline_reduce_scatter=on --xla_gpu_pipeline_all_reduce=on
 --xla_gpu_enable_while_loop_double_buffering=true
 --xla_gpu_enable_all_gather_combine_by_dim=false --xla_gpu_enable_reduce_scatter_combine_by_dim=false
 --xla_disable_hlo_passes=rematerialization"
RECIPE_XLA_FLAGS=$(echo $RECIPE_XLA_FLAGS)  # one line
# With XLA_FLAGS unset MaxText sets its own that dump every train-step HLO to /tmp/xla_dump (slower compile);
# an empty --xla_dump_to is XLA's default and keeps the dump off.
DEFAULT_XLA_FLAGS="--xla_dump_to="

# ---------------------------------------------------------------- running
# run NAME CAP_S HEADER -- COMMAND...: writes $OUTDIR/NAME.log with a #MTRUN header and a #MTEXIT footer.
run() {
  local name=$1 cap=$2 hdr=$3; shift 4
  local log="$OUTDIR/$name.log" left=$((BUDGET - SECONDS - RESERVE))
  local limit=$(( cap < left ? cap : left ))
  echo "#MTRUN name=$name $hdr" > "$log"
  if [ "$limit" -lt "$MIN_RUN_S" ]; then
    echo "#MTSKIP why=only_${left}s_left" >> "$log"; say "-- $name skipped: ${left} s left"; return
  fi
  say "-- $name (at ${SECONDS} s, timeout ${limit} s)"
  local start=$SECONDS
  ( cd "$WORK" && timeout -k 5 "$((limit - 5))" "$@" ) >> "$log" 2>&1
  local rc=$?
  echo "#MTEXIT rc=$rc wall_s=$((SECONDS - start)) timeout_s=$limit" >> "$log"
  say "   rc=$rc in $((SECONDS - start)) s: $("$PY" "$MT/summarize.py" "$log" | sed -n 3p | cut -c1-140)"
}

shape_header() {  # model layers d heads kv hd ff vocab seq batch
  echo "model=$1 layers=$2 d=$3 heads=$4 kv=$5 hd=$6 ff=$7 vocab=$8 seq=$9 batch=${10}"
}

jaxscale() {  # NAME CAP MODEL REMAT SHAPE...
  local name=$1 cap=$2 model=$3 remat=$4; shift 4
  local L=$1 d=$2 hq=$3 hkv=$4 hd=$5 ff=$6 V=$7 T=$8 B=$9
  run "$name" "$cap" "prog=jaxscale config=remat-$remat remat=$remat $(shape_header "$model" "$@")" -- \
    env PYTHONPATH="$JAXSCALE_SRC" "$PY" -m jaxscale.cli bench \
      --set model.preset=llama-1b --set model.vocab_size="$V" --set model.seq_len="$T" \
      --set model.d_model="$d" --set model.n_layers="$L" --set model.n_heads="$hq" --set model.n_kv_heads="$hkv" \
      --set model.d_ff="$ff" --set model.tie_embeddings=true --set data.document_masking="${JS_MASKING:-false}" --set model.attention="${JS_ATTENTION:-auto}" \
      --set train.batch_size="$B" --set train.scan_unroll="$L" --set train.remat="$remat" \
      --windows "$JS_WINDOWS" "${JS_EXTRA[@]}"
}

maxtext() {  # NAME CAP MODEL CONFIG(minimal|gpurecipe) STEPS SHAPE...
  local name=$1 cap=$2 model=$3 config=$4 steps=$5; shift 5
  local L=$1 d=$2 hq=$3 hkv=$4 hd=$5 ff=$6 V=$7 T=$8 B=$9
  local flags remat extra
  if [ "$config" = gpurecipe ]; then
    flags=$RECIPE_XLA_FLAGS; remat=minimal_with_context; extra="use_iota_embed=true"
  else
    flags=$DEFAULT_XLA_FLAGS; remat=${MT_REMAT:-minimal}; extra=""
  fi
  [ "$HW" = cpu ] && flags=$DEFAULT_XLA_FLAGS
  run "$name" "$cap" "prog=maxtext config=$config remat=$remat $(shape_header "$model" "$@")" -- \
    env PYTHONPATH="$MT_PYTHONPATH" DECOUPLE_GCLOUD=TRUE XLA_FLAGS="$flags" \
    "$PY" "$MT/mt_launch.py" "$SITE/maxtext/configs/base.yml" run_name="$name" base_output_directory=/tmp/mt_runs \
      hardware=$HW skip_jax_distributed_system=true dataset_type=synthetic enable_checkpointing=false \
      attention=$MT_ATTN dtype=bfloat16 weight_dtype=float32 opt_type=adamw enable_dropout=false steps="$steps" \
      decoder_block=llama2 logits_via_embedding=true rope_max_timescale=500000 normalization_layer_epsilon=1e-5 \
      base_emb_dim="$d" base_num_query_heads="$hq" base_num_kv_heads="$hkv" head_dim="$hd" base_mlp_dim="$ff" \
      base_num_decoder_layers="$L" vocab_size="$V" max_target_length="$T" per_device_batch_size="$B" \
      scan_layers=false remat_policy="$remat" $extra
}

if [ "${MT_LONG:-0}" = 1 ]; then
  # Long context (issue 36, item 5): Llama 3.2 1B at 8k, 16k and 32k tokens a row, LONG_TOKENS a step (32,768:
  # batch 4, 2, 1); jaxscale with remat JS_LONG_REMAT (default dots), MaxText with MT_REMAT (default minimal;
  # `full` where minimal does not fit). Each pair shares a third of the budget.
  read -r L d hq hkv hd ff V _ _ <<< "$SHAPE_1B"
  TOKENS=${LONG_TOKENS:-32768}
  LONG_SEQS=${LONG_SEQS:-8192 16384 32768}
  [ "$HW" = cpu ] && { TOKENS=256; LONG_SEQS="64 128"; }
  n=$(echo $LONG_SEQS | wc -w)
  for T in $LONG_SEQS; do
    B=$((TOKENS / T)); k=$([ "$T" -ge 1024 ] && echo $((T / 1024))k || echo "$T"); share=$(( (BUDGET - SECONDS - RESERVE) / n / 2 ))
    jaxscale "js-1b-$k" "$share" "1b-$k" "${JS_LONG_REMAT:-dots}" $L $d $hq $hkv $hd $ff $V $T $B
    share=$(( (BUDGET - SECONDS - RESERVE) / n ))
    maxtext "mt-1b-$k" "$share" "1b-$k" minimal "$MT_STEPS_1B" $L $d $hq $hkv $hd $ff $V $T $B
    n=$((n - 1))
  done
  say ""
  say "== results, long context ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), total ${SECONDS} s)"
  "$PY" "$MT/summarize.py" "$OUTDIR"/js-1b-[0-9]*.log "$OUTDIR"/mt-1b-[0-9]*.log 2>&1 | tee -a "$SUM"
  exit 0
fi

if [ -z "${MT_ONLY_3B:-}" ]; then
jaxscale js-1b              150 1b none                     $SHAPE_1B
maxtext  mt-1b-minimal      170 1b minimal   "$MT_STEPS_1B" $SHAPE_1B
[ -z "${MT_SKIP_RECIPE_1B:-}" ] && maxtext  mt-1b-gpurecipe    150 1b gpurecipe "$MT_STEPS_1B" $SHAPE_1B
BEST=$("$PY" "$MT/summarize.py" --best "$OUTDIR/mt-1b-minimal.log" "$OUTDIR/mt-1b-gpurecipe.log")
fi
BEST=${BEST:-minimal}
OTHER=$([ "$BEST" = minimal ] && echo gpurecipe || echo minimal)
say "MaxText 1B: faster config $BEST"
if [ -n "${MT_SKIP_3B:-}" ]; then BUDGET=$SECONDS; fi  # MT_SKIP_3B=1: the 1B trio only
# The 3B pair shares what is left, half each at first: one without the other compares nothing.
HALF=$(( (BUDGET - SECONDS - RESERVE) / 2 ))
jaxscale js-3b              "$(( HALF < 200 ? HALF : 200 ))" 3b "$JS3B_REMAT" $SHAPE_3B
if grep -q '^#MTSKIP' "$OUTDIR/js-3b.log"; then
  say "-- mt-3b-$BEST not run: no jaxscale 3B run to compare with"
else
  maxtext "mt-3b-$BEST"     "${MT3B_CAP:-200}" 3b "$BEST"   "$MT_STEPS_3B" $SHAPE_3B
fi
if [ $((BUDGET - SECONDS - RESERVE)) -ge 140 ]; then
  maxtext "mt-3b-$OTHER"    170 3b "$OTHER"  "$MT_STEPS_3B" $SHAPE_3B
else
  say "-- mt-3b-$OTHER not run: $((BUDGET - SECONDS)) s left"
fi

# ---------------------------------------------------------------- table
say ""
say "== results ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), total ${SECONDS} s)"
logs=()
for n in js-1b mt-1b-minimal mt-1b-gpurecipe js-3b mt-3b-minimal mt-3b-gpurecipe; do
  [ -f "$OUTDIR/$n.log" ] && logs+=("$OUTDIR/$n.log")
done
"$PY" "$MT/summarize.py" "${logs[@]}" 2>&1 | tee -a "$SUM"
