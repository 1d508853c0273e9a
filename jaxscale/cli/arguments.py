"""The command-line flags several commands share (the config and the processes of a run), defined once."""
from __future__ import annotations

import argparse

from jaxscale.distributed import DEFAULT_HEARTBEAT_S, initialize
from jaxscale.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None,
                        help="experiment preset name (`jaxscale presets` lists them) or a YAML path (default: default)")
    add_overrides_argument(parser)


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
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
