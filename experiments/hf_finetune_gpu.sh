#!/usr/bin/env bash
# Fine-tuning from Hugging Face weights against training from scratch, one GPU: `jaxscale bench` of the Llama 3.2
# 1B shape (8 x 2048, packed documents) from a random init, then from a transformers-written checkpoint of the same
# shape (model.init_from=hf:<dir>, the shape read from its config.json). Both run the same compiled step, so
# tokens/s should agree; the fine-tuning run also reports how long the weights took to reach the devices.
#   OUT=/tmp/hf_finetune bash experiments/hf_finetune_gpu.sh [BUDGET_S]
set -u
OUT=${OUT:-/tmp/hf_finetune}
BUDGET=${1:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "from pathlib import Path; import sys; sys.path.insert(0, 'experiments'); \
from hf_import_bench import write_checkpoint; print(f'wrote in {write_checkpoint(Path(\"/tmp/hf/llama-1b\")):.1f} s')"
COMMON=(--set model.seq_len=2048 --set train.batch_size=8 --set train.scan_unroll=16 --windows 3 --steps-per-window 5)
half=$(( (BUDGET - SECONDS) / 2 ))
timeout -k 5 "$half" python -m jaxscale.cli bench --set model.preset=llama-1b --set model.vocab_size=128256 \
  --set model.tie_embeddings=true "${COMMON[@]}" --out "$OUT/scratch.json" > "$OUT/scratch.log" 2>&1
echo "scratch rc=$?"
timeout -k 5 $(( BUDGET - SECONDS )) python -m jaxscale.cli bench --set model.init_from=hf:/tmp/hf/llama-1b \
  "${COMMON[@]}" --out "$OUT/finetune.json" > "$OUT/finetune.log" 2>&1
echo "finetune rc=$?"
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {n: json.loads((out / f"{n}.json").read_text()) for n in ("scratch", "finetune") if (out / f"{n}.json").exists()}
for n, r in rows.items():
    print(f"| {n} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gb']:.1f} GB | {r['attention_kernel']} |")
if len(rows) == 2:
    print(f"fine-tune / scratch = {rows['finetune']['tokens_per_s'] / rows['scratch']['tokens_per_s']:.3f}")
PY
