#!/usr/bin/env bash
# Issue 28's check that the restructuring left GPU throughput unchanged: `jaxscale bench` of the tree before it
# and of this tree, alternated on one GPU in one device call (before, after, before, after per model size), so
# that clock and thermal drift fall on both alike. Not yet run: no GPU was lent in the session that wrote it.
# Prepare the tree before (here, then carry it to the device):
#   git archive 4248a9f --prefix=.before/ | tar -x      # the last commit before the restructuring
#   bash experiments/restructure_throughput.sh .before [OUT_DIR]
# Prints one line per bench (tree, size, tokens/s, step ms) and the after/before ratio of the medians last.
# Documents are not masked in either, so both run cuDNN attention (the packed-document kernel came later).
# SIZES="124m" limits the sizes.
set -u
before=${1:?give the directory holding the tree before the restructuring}
out=${2:-${OUT:-/tmp/restructure_throughput}}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$out/gpu.txt"
for size in ${SIZES:-124m 350m}; do
  for round in 1 2; do
    for tree in before after; do
      dir=$PWD; [ "$tree" = before ] && dir=$before
      (cd "$dir" && PYTHONPATH=$dir python3 -m jaxscale.cli bench "gpt2-$size" \
        --set data.document_masking=false) > "$out/$tree-$size-$round.log" 2>&1
      grep '^{' "$out/$tree-$size-$round.log" | tail -1 > "$out/$tree-$size-$round.json"
    done
  done
done
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
for size in ("124m", "350m"):
    median = {}
    for tree in ("before", "after"):
        rows = [json.loads(p.read_text()) for p in sorted(out.glob(f"{tree}-{size}-*.json")) if p.read_text().strip()]
        for r in rows:
            print(f"{tree:6} gpt2-{size} {r['tokens_per_s']:12,.0f} tok/s  {r['step_s'] * 1e3:7.2f} ms")
        median[tree] = statistics.median(r["tokens_per_s"] for r in rows) if rows else None
    if all(median.values()):
        print(f"gpt2-{size}: after / before = {median['after'] / median['before']:.4f}")
PY
