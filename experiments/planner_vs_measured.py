"""The planner's predictions against measurements on one GPU: gpt2-124m, gpt2-350m, a Llama-1B shape, the Llama-3-8B
shape with the optimizer state offloaded (the headline), the deepest d=4096 Llama shape the planner fits
without offload, and a 12.4B Llama shape (52 layers) that it fits only with the master parameters offloaded too;
the two offloaded ones also with the optimizer update computed in host memory (train.offload_update=host), to
measure where it is faster (the planner times the device update).

For each case the planner (`jaxscale.planner`) ranks the layouts for one device of the kind found here, and the
top one (what `--set plan=auto` trains; for the last case the top one without offload) is run by `jaxscale bench`
in its own process with its `--set` flags. The table puts predicted step time, tokens/s and device memory beside the measured
step time, tokens/s, MFU, peak device memory (the runtime's peak_bytes_in_use) and peak host memory (the bench
process's max RSS, from wait4), with the error of each prediction in percent.

Usage (on the GPU host, from the repository root; about 15 minutes on an H200):
    python experiments/planner_vs_measured.py [--cases llama-8b-offload llama-deepest-no-offload
        llama-12b-offload-params llama-8b-offload-host-update llama-12b-offload-params-host-update llama-1b
        gpt2-124m gpt2-350m] [--out runs/planner_vs_measured] [--budget-s S] [--case-timeout-s S]
Device call (a later session):
    run(command="python experiments/planner_vs_measured.py --out $OUT/planner", kind="nvidia-h200", timeout_s=1800)
Where the optimizer update is faster, device or host (one call per size, within the 600 s a call may run; each
command is one line):
    run(command="python experiments/planner_vs_measured.py --cases llama-8b-offload llama-8b-offload-host-update
        --budget-s 570 --case-timeout-s 280 --out $OUT/update-8b", kind="nvidia-h200", timeout_s=600)
    run(command="python experiments/planner_vs_measured.py --cases llama-12b-offload-params
        llama-12b-offload-params-host-update --budget-s 570 --case-timeout-s 280 --out $OUT/update-12b",
        kind="nvidia-h200", timeout_s=600)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA_8B = ["model.preset=llama-8b", "model.seq_len=2048", "train.batch_size=32", "train.scan_unroll=1"]
LLAMA_12B = ["model.preset=llama-8b", "model.n_layers=52", "model.seq_len=2048", "train.batch_size=8",
             "train.scan_unroll=1"]
HOST_UPDATE = ["train.offload_optimizer=true", "train.offload_update=host"]  # the planner keeps layouts that allow it
CASES = {  # name -> (experiment, overrides)
    "llama-8b-offload": ("gpt2-124m", LLAMA_8B),
    "llama-deepest-no-offload": ("gpt2-124m", LLAMA_8B),  # n_layers found below
    # 12.4B: the planner fits it on one H200 only with the master parameters offloaded too (tests/test_memory_plan)
    "llama-12b-offload-params": ("gpt2-124m", LLAMA_12B),
    # the same layouts with the update computed in host memory instead of on the device: which is faster
    "llama-8b-offload-host-update": ("gpt2-124m", [*LLAMA_8B, *HOST_UPDATE]),
    "llama-12b-offload-params-host-update": ("gpt2-124m", [*LLAMA_12B, *HOST_UPDATE]),
    "llama-1b": ("gpt2-124m", ["model.preset=llama-1b", "model.seq_len=2048", "train.batch_size=16",
                             "train.scan_unroll=1"]),
    "gpt2-124m": ("gpt2-124m", []),
    "gpt2-350m": ("gpt2-350m", []),
}


def deepest_without_offload(overrides: list[str], kind: str) -> list[str]:
    """The llama-8b shape with the most layers the planner fits on one device without host offload."""
    from jaxscale.config import load_config
    from jaxscale.planner.plan import rank
    from jaxscale.planner.rates import rates_for

    best = None
    for layers in range(2, 33, 2):
        config = load_config("gpt2-124m", [*overrides, f"model.n_layers={layers}"])
        ranked = [r for r in rank(config, 1, rates_for(kind)) if not r.estimate.candidate.host_offload]
        if ranked and ranked[0].fits:
            best = layers
    if best is None:
        raise SystemExit("no d=4096 Llama depth fits one device without offload by the planner's estimate")
    return [*overrides, f"model.n_layers={best}"]


def predicted(experiment: str, overrides: list[str], kind: str, no_offload: bool):
    from jaxscale.config import load_config
    from jaxscale.planner.plan import rank
    from jaxscale.planner.rates import rates_for

    config = load_config(experiment, overrides)
    ranked = rank(config, 1, rates_for(kind))
    if no_offload:
        ranked = [r for r in ranked if not r.estimate.candidate.host_offload]
    return ranked[0].estimate


def measure(experiment: str, sets: list[str], out: Path, timeout_s: float) -> tuple[dict, float]:
    """`jaxscale bench` of the layout in its own process, killed after timeout_s: its result row ({} when it
    failed or ran out of time) and its max RSS in GB."""
    command = [sys.executable, "-m", "jaxscale.cli", "bench", experiment, "--out", str(out), "--force",
               "--warmup", "2", "--windows", "2", "--steps-per-window", "2",
               *[a for s in sets for a in ("--set", s)]]
    print(" ".join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    _, status, usage = os.wait4(process.pid, 0)
    timer.cancel()
    host_gb = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    if os.waitstatus_to_exitcode(status) != 0:
        return {}, host_gb
    return json.loads(out.read_text()), host_gb


def error(predicted_value: float, measured_value: float | None) -> str:
    return f"{100 * (predicted_value - measured_value) / measured_value:+.0f}%" if measured_value else "-"


def main() -> int:
    import jax

    from jaxscale.cost.catalog import accelerator_for_device_kind

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="runs/planner_vs_measured")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting cases after this many seconds, and cut each case at what is left")
    parser.add_argument("--case-timeout-s", type=float, default=600)
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    device_kind = jax.devices()[0].device_kind
    accelerator = accelerator_for_device_kind(device_kind)
    if accelerator is None or accelerator.key == "cpu":
        raise SystemExit(f"run this on a GPU the hardware catalog knows (found {device_kind!r})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        left = deadline - time.monotonic()
        if left < 60:
            print(f"{name}: not run, {left:.0f} s left", file=sys.stderr)
            continue
        experiment, overrides = CASES[name]
        no_offload = name == "llama-deepest-no-offload"
        if no_offload:
            overrides = deepest_without_offload(overrides, accelerator.key)
        guess = predicted(experiment, overrides, accelerator.key, no_offload)
        sets = [*overrides, *guess.candidate.overrides()]
        result, host_gb = measure(experiment, sets, out / f"{name}.json", min(args.case_timeout_s, left - 20))
        rows.append((name, guess, result, host_gb, sets))
    print(f"\n{device_kind} ({accelerator.key}), jax {jax.__version__}; predicted at {accelerator.key}'s catalog MFU")
    print("| case | layout (--set) | predicted step | measured step | error | predicted tok/s | measured tok/s "
          "(MFU) | predicted memory | measured peak memory | error | peak host memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, guess, result, host_gb, sets in rows:
        step = result.get("step_s")
        memory = result.get("peak_memory_gb")
        mfu = result.get("mfu")
        print(f"| {name} | `{' '.join(sets)}` | {guess.step_s * 1e3:.1f} ms | "
              + (f"{step * 1e3:.1f} ms" if step else "failed") + f" | {error(guess.step_s, step)} | "
              f"{guess.tokens_per_s:,.0f} | "
              + (f"{result['tokens_per_s']:,.0f} ({100 * mfu:.1f}%)" if step and mfu else "-")
              + f" | {guess.device_bytes / 1e9:.1f} GB | " + (f"{memory:.1f} GB" if memory else "-")
              + f" | {error(guess.device_bytes / 1e9, memory)} | {host_gb:.1f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
