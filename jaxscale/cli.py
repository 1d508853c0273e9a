"""The `jaxscale` command: train, and the tools around training (bench, estimate, plot, scaling, tokenizer,
export)."""
from __future__ import annotations

import argparse
import logging
import sys

from jaxscale.arguments import add_config_arguments, add_distributed_arguments, initialize_distributed
from jaxscale.distributed import launch_local
from jaxscale.errors import ConfigError


def run_train(args: argparse.Namespace) -> int:
    if args.num_processes is not None and not args.coordinator and args.process_id is None \
            and not args.distributed:
        if args.num_processes < 1 or args.max_restarts < 0:
            raise ConfigError(f"--num-processes {args.num_processes} must be >= 1 and --max-restarts "
                              f"{args.max_restarts} >= 0")
        argv = ["train", *([args.experiment] if args.experiment else []),
                *[a for s in args.overrides for a in ("--set", s)],
                "--heartbeat-timeout", str(args.heartbeat_timeout)]
        from jaxscale.config import load_config
        from jaxscale.training.loop import newest_checkpoint

        config = load_config(args.experiment, args.overrides)  # a bad config is said once, not once per process
        return launch_local(argv, args.num_processes, args.max_restarts, lambda: newest_checkpoint(config))
    initialize_distributed(args)
    from jaxscale.config import load_config
    from jaxscale.training import train
    from jaxscale.training.preemption import EXIT_PREEMPTED

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
    from jaxscale.presets import list_presets

    print(list_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxscale.bench import add_parser as add_bench
    from jaxscale.cost.cli import add_parser as add_estimate
    from jaxscale.data.tokenizer_cli import add_parser as add_tokenizer
    from jaxscale.hf.exporter import add_parser as add_export
    from jaxscale.observe.report import add_parser as add_report
    from jaxscale.planner.cli import add_parser as add_plan
    from jaxscale.scaling.cli import add_parser as add_scaling
    from jaxscale.tpu_compile import add_parser as add_compile
    from jaxscale.tpu_vm import add_parser as add_tpu
    from jaxscale.training.curves import add_parser as add_plot

    parser = argparse.ArgumentParser(prog="jaxscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a model (default: a small model on built-in text)",
        epilog="Rerunning the same command continues from the newest good checkpoint of the run_dir. Exit "
               "codes: 0 done; 2 a configuration or checkpoint problem (the message says what to do); 3 bad updates "
               "kept coming (the newest checkpoint is the last good state); 75 "
               "stopped by SIGTERM or SIGINT after saving a checkpoint: rerun to continue.")
    add_config_arguments(train)
    add_distributed_arguments(train)
    train.set_defaults(func=run_train)
    commands.add_parser("presets", help="list the experiment and mesh presets, one line each").set_defaults(
        func=run_presets)
    add_bench(commands)
    add_compile(commands)
    add_estimate(commands)
    add_plot(commands)
    add_scaling(commands)
    add_tokenizer(commands)
    add_export(commands)
    add_plan(commands)
    add_tpu(commands)
    add_report(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxscale.checkpointing import CheckpointError
    from jaxscale.cost.catalog import CatalogError
    from jaxscale.data import DataError
    from jaxscale.errors import ConfigError
    from jaxscale.platforms import skip_absent_tpu
    from jaxscale.training.loop import EXIT_DIVERGED, TrainingDiverged

    skip_absent_tpu()
    # force: importing orbax already configured logging (absl does on its first message)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO; jaxscale does too
    # JAX tries every backend it knows and reports each one missing (no libtpu: "Unable to initialize backend
    # 'tpu'") at INFO; a failure of a platform that was asked for is still an error.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ConfigError, DataError, CatalogError, CheckpointError) as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
