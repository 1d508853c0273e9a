"""Pipeline parallelism on 2 and 4 GPUs: train-step time against pipeline microbatches, per schedule.

Each point is one `jaxscale bench` run (its own process, on the first P GPUs) of a GPT-2-size experiment with
mesh.pipeline=P, mesh.data=1. The baseline is the same model and batch on one GPU: split perfectly over P
stages it would take single / P, and with the bubble fraction (p - 1) / (v m + p - 1) idle, theory = single / P
/ (1 - bubble). The table puts each measured step time next to that theory.

The schedule runs unrolled (pipeline.unroll=true) unless `--set pipeline.unroll=false` is given (the 1F1B
schedules ignore it; they recompute each chunk's forward in its backward, about a third more compute than the
theory counts). Pick the batch
so that microbatches keep several sequences: below ~8 sequences the kernels themselves slow down (gpt2-350m on
an H100: 7.8 ms per sequence at batch 4, 6.1 at 32), which no schedule can hide. A batch too large for one GPU
gets a baseline with gradient accumulation, `--single-microbatches N` (the same arithmetic, in N pieces).

Usage (on the GPU host, from the repository root):
    python experiments/pipeline_bench.py [--experiment gpt2-350m] [--gpus 2 4] [--batch 32]
        [--microbatches-per-stage 1 2 4 8] [--schedules gpipe circular 1f1b interleaved_1f1b] [--repeats 2]
        [--single-microbatches 1] [--out runs/pipeline_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxscale.parallel import bubble_fraction  # noqa: E402 (after the path is set)


def bench(experiment: str, gpus: int, overrides: list[str], log: Path, timing: list[str]) -> dict:
    """One `jaxscale bench` run on the first `gpus` GPUs; its JSON line, or the error it ended with."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "jaxscale.cli", "bench", experiment, *timing,
               *[arg for o in overrides for arg in ("--set", o)]]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:100]}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="gpt2-350m")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4], help="pipeline stages (one per GPU)")
    parser.add_argument("--batch", type=int, default=32, help="train.batch_size, sequences per step")
    parser.add_argument("--microbatches-per-stage", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="pipeline.microbatches = this x stages")
    parser.add_argument("--schedules", nargs="+", choices=["gpipe", "circular", "1f1b", "interleaved_1f1b"],
                        default=["gpipe", "circular"],
                        help="schedules to run, in this order")
    parser.add_argument("--repeats", type=int, default=2, help="layer chunks per stage, circular schedule")
    parser.add_argument("--single-microbatches", type=int, default=1,
                        help="train.microbatches of the one-GPU baseline, for a batch too large for one GPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run, e.g. train.remat=full")
    parser.add_argument("--timing", default="--warmup 3 --windows 3 --steps-per-window 5",
                        help="arguments passed on to jaxscale bench")
    parser.add_argument("--out", default="runs/pipeline_bench", help="folder for each run's log and results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.batch_size={args.batch}", "pipeline.unroll=true", *args.overrides]

    single = bench(args.experiment, 1, common + ["mesh={data: 1, pipeline: 1, fsdp: 1, tensor: 1}",
                                                 f"train.microbatches={args.single_microbatches}"],
                   out / "single.log", args.timing.split())
    (out / "single.json").write_text(json.dumps(single) + "\n")
    rows = []
    for gpus in args.gpus:
        for schedule in args.schedules:
            repeats = args.repeats if schedule in ("circular", "interleaved_1f1b") else 1
            for per_stage in args.microbatches_per_stage:
                m = per_stage * gpus
                if args.batch % m:
                    continue
                settings = [f"mesh={{data: 1, pipeline: {gpus}, fsdp: 1, tensor: 1}}",
                            f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}"]
                if repeats > 1:
                    settings.append(f"pipeline.repeats={repeats}")
                name = f"p{gpus}-{schedule}-m{m}"
                print(f"running {name} ...", flush=True)
                result = bench(args.experiment, gpus, common + settings, out / f"{name}.log", args.timing.split())
                (out / f"{name}.json").write_text(json.dumps(result) + "\n")
                rows.append((gpus, schedule, m, repeats, bubble_fraction(gpus, m, repeats), result))

    if "error" in single:
        print(f"the single-GPU baseline failed: {single['error']}")
        return 1
    single_ms = single["step_s"] * 1e3
    overrides = "".join(f" --set {o}" for o in args.overrides)  # a model.preset there changes the model
    print(f"\n{args.experiment}{overrides} ({single['params_m']:.0f}M parameters), batch {args.batch}; "
          f"one GPU: {single_ms:.1f} ms; theory = one GPU / P / (1 - bubble)")
    print(f"{'P':>2} {'schedule':>16} {'m':>3} {'v':>2} {'bubble':>7} {'theory ms':>9} {'step ms':>8} "
          f"{'ratio':>6} {'mem GB':>7}")
    for gpus, schedule, m, repeats, bubble, r in rows:
        if "error" in r:
            print(f"{gpus:>2} {schedule:>16} {m:>3} {repeats:>2} {bubble:>7.1%}  failed: {r['error']}")
            continue
        theory, step_ms, mem = single_ms / gpus / (1 - bubble), r["step_s"] * 1e3, r.get("peak_memory_gb")
        print(f"{gpus:>2} {schedule:>16} {m:>3} {repeats:>2} {bubble:>7.1%} {theory:>9.1f} {step_ms:>8.1f} "
              f"{step_ms / theory:>6.2f} {mem if mem is not None else float('nan'):>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
