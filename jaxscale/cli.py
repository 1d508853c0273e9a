"""The `jaxscale` command: train, and the tools around training (bench, estimate, plot, scaling, tokenizer,
export)."""
from __future__ import annotations

import argparse
import logging
import sys

from jaxscale.distributed import DEFAULT_HEARTBEAT_S, initialize, launch_local
from jaxscale.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None,
                        help="experiment preset name (`jaxscale presets` lists them) or a YAML path (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 --set mesh.fsdp=8 (repeatable)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (hosts)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() and let it detect the cluster (TPU VMs, SLURM)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, for a cluster JAX cannot "
                                                                   "detect (e.g. several processes on one machine)")
    group.add_argument("--num-processes", type=int, help="with --coordinator: how many processes the run has; "
                                                          "alone: start that many on this machine")
    group.add_argument("--process-id", type=int)
    group.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                       help="a process silent this long counts as lost: the others exit with code 76 (default "
                            "%(default)s)")
    group.add_argument("--max-restarts", type=int, default=3, metavar="K",
                       help="--num-processes without --coordinator: restart all processes at most K times when "
                            "they stop with code 75 or 76 (default %(default)s)")


def initialize_distributed(args: argparse.Namespace) -> None:
    if args.heartbeat_timeout <= 0:
        raise ConfigError(f"--heartbeat-timeout {args.heartbeat_timeout} must be > 0 seconds")
    if args.coordinator:
        missing = [flag for flag, value in (("--num-processes N", args.num_processes),
                                            ("--process-id I", args.process_id)) if value is None]
        if missing:
            raise ConfigError(f"--coordinator needs {' and '.join(missing)} too (every process gets the same "
                              f"--coordinator and --num-processes, and its own --process-id 0..N-1)")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise ConfigError(f"--num-processes {args.num_processes} --process-id {args.process_id}: need "
                              f"--num-processes >= 1 and --process-id from 0 to --num-processes - 1")
        initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    elif args.process_id is not None or (args.num_processes is not None and args.distributed):
        # without a coordinator they would be ignored: each process would train alone into the same run_dir
        raise ConfigError("--process-id takes effect only with --coordinator: add --coordinator HOST:PORT (the "
                          "address of process 0, the same on every process); --num-processes N alone starts N "
                          "processes on this machine"
                          + ("; --distributed detects them by itself, so drop them there" if args.distributed
                             else ""))
    elif args.distributed:
        initialize(None, None, None, args.heartbeat_timeout)


def run_train(args: argparse.Namespace) -> int:
    if args.num_processes is not None and not args.coordinator and args.process_id is None \
            and not args.distributed:
        if args.num_processes < 1 or args.max_restarts < 0:
            raise ConfigError(f"--num-processes {args.num_processes} must be >= 1 and --max-restarts "
                              f"{args.max_restarts} >= 0")
        argv = ["train", *([args.experiment] if args.experiment else []),
                *[a for s in args.overrides for a in ("--set", s)],
                "--heartbeat-timeout", str(args.heartbeat_timeout)]
        return launch_local(argv, args.num_processes, args.max_restarts)
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
    add_tpu(commands)
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
