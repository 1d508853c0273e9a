"""`jaxscale bench`: time the training step of an experiment (jaxscale.bench), print the result as one JSON line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from jaxscale.bench import (
    ACCELERATOR_WARMUP_S,
    PROFILE_STEPS,
    check_bench_arguments,
    check_out_file,
    run_bench,
)
from jaxscale.cli.arguments import add_config_arguments, add_distributed_arguments, initialize_distributed
from jaxscale.config import load_config
from jaxscale.distributed import any_process
from jaxscale.errors import ConfigError
from jaxscale.trace_summary import DeviceTime, format_summary
from jaxscale.training.rows import encode_row


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time the training step: tokens/s, MFU, memory, compile time")
    add_config_arguments(p)
    add_distributed_arguments(p)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps, at least")
    p.add_argument("--warmup-s", type=float, default=None,
                   help=f"warm up for at least this many seconds (default {ACCELERATOR_WARMUP_S:g} on GPUs and TPUs, "
                        "0 on the CPU): clocks settle under the power cap")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--steps-per-window", type=int, default=10)
    p.add_argument("--profile", metavar="DIR",
                   help="also write a trace of a few steps (TensorBoard / Perfetto) and print where their device "
                        "time went")
    p.add_argument("--profile-steps", type=int, default=PROFILE_STEPS,
                   help=f"steps to trace with --profile (default {PROFILE_STEPS}); the first steps after the timing "
                        "run at a recovered clock, more steps read nearer the sustained step")
    p.add_argument("--out", metavar="FILE", help="write the result as JSON here too")
    p.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    p.set_defaults(func=run_bench_command)
    return p


def run_bench_command(args: argparse.Namespace) -> int:
    # Every flag is checked before any work: a bad one must not cost a whole benchmark.
    check_bench_arguments(warmup=args.warmup, windows=args.windows, steps_per_window=args.steps_per_window,
                          profile_dir=args.profile, profile_steps=args.profile_steps, warmup_s=args.warmup_s)
    initialize_distributed(args)
    problem = None
    if args.out is not None and jax.process_index() == 0:  # process 0 writes it
        try:
            check_out_file(args.out, args.force)
        except ConfigError as e:
            problem = str(e)
    if any_process(problem is not None):
        raise ConfigError(problem or "--out: process 0 cannot write it")
    config = load_config(args.experiment, args.overrides + ["train.progress=false"])
    result = run_bench(config, warmup=args.warmup, warmup_s=args.warmup_s, windows=args.windows,
                       steps_per_window=args.steps_per_window, profile_dir=args.profile,
                       profile_steps=args.profile_steps)
    if result["profile"] is not None:  # the JSON line stays last on stdout
        print(format_summary([DeviceTime(**device) for device in result["profile"]]), file=sys.stderr)
        print(f"timed step (median window): {result['step_s'] * 1e3:.2f} ms", file=sys.stderr)
    line = encode_row(result)  # strict JSON: a NaN loss is written as null (see training/rows.py)
    print(line)  # every process: its own device's peak memory and its own view of the timing
    if args.out is not None and jax.process_index() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return 0
