"""`jaxscale train` (one process, or several on this machine or a cluster) and `jaxscale presets`."""
from __future__ import annotations

import argparse
import sys

from jaxscale.cli.arguments import add_config_arguments, add_distributed_arguments, initialize_distributed
from jaxscale.config import load_config
from jaxscale.distributed import launch_local
from jaxscale.errors import ConfigError
from jaxscale.presets import list_presets
from jaxscale.training import train
from jaxscale.training.loop import newest_checkpoint
from jaxscale.training.preemption import EXIT_PREEMPTED


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model (default: a small model on built-in text)",
        epilog="Rerunning the same command continues from the newest good checkpoint of the run_dir. Exit "
               "codes: 0 done; 2 a configuration or checkpoint problem (the message says what to do); 3 bad updates "
               "kept coming (the newest checkpoint is the last good state); 75 "
               "stopped by SIGTERM or SIGINT after saving a checkpoint: rerun to continue.")
    add_config_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(func=run_train)
    return p


def add_presets_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("presets", help="list the experiment and mesh presets, one line each")
    p.set_defaults(func=run_presets)
    return p


def run_train(args: argparse.Namespace) -> int:
    if args.num_processes is not None and not args.coordinator and args.process_id is None \
            and not args.distributed:
        if args.num_processes < 1 or args.max_restarts < 0:
            raise ConfigError(f"--num-processes {args.num_processes} must be >= 1 and --max-restarts "
                              f"{args.max_restarts} >= 0")
        argv = ["train", *([args.experiment] if args.experiment else []),
                *[a for s in args.overrides for a in ("--set", s)],
                "--heartbeat-timeout", str(args.heartbeat_timeout)]
        config = load_config(args.experiment, args.overrides)  # a bad config is said once, not once per process
        return launch_local(argv, args.num_processes, args.max_restarts, lambda: newest_checkpoint(config))
    initialize_distributed(args)
    config = load_config(args.experiment, args.overrides)
    result = train(config)
    if result.preempted:  # the checkpoint is saved; the scheduler (or the user) reruns the command
        print(f"stopped by a preemption notice at step {int(result.state.step)}, checkpoint saved; rerun the "
              f"same command to continue (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    rows = [row for row in result.metrics if "loss" in row]
    evals = [row["eval_loss"] for row in result.metrics if "eval_loss" in row]
    if rows:
        first, last = rows[0], rows[-1]
        trained = (f"trained {last['step']} steps" if first["step"] == 1 else
                   f"resumed after step {first['step'] - 1}, trained to step {last['step']}")
        summary = f"{trained}: loss {first['loss']:.3f} -> {last['loss']:.3f}"
        if evals:
            summary += f", eval loss {evals[-1]:.3f}"
        run_dir = config.resolved_run_dir()
        print(summary + f"; metrics in {run_dir / 'metrics.jsonl'} (curves: jaxscale plot {run_dir})")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    print(list_presets())
    return 0
