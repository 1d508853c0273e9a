"""The `jaxscale` command: train, and the tools around training (estimate, scaling, tokenizer)."""
from __future__ import annotations

import argparse
import logging
import sys



def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None,
                        help="experiment name in experiments/ or a YAML path (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 --set mesh.fsdp=8 (repeatable)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (hosts)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() and let it detect the cluster (TPU VMs, SLURM)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, for a cluster JAX cannot "
                                                                   "detect (e.g. several processes on one machine)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)


def initialize_distributed(args: argparse.Namespace) -> None:
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id too")
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def run_train(args: argparse.Namespace) -> int:
    initialize_distributed(args)
    from jaxscale.config import load_config
    from jaxscale.training import train

    config = load_config(args.experiment, args.overrides)
    result = train(config)
    losses = [row["loss"] for row in result.metrics if "loss" in row]
    evals = [row["eval_loss"] for row in result.metrics if "eval_loss" in row]
    if losses:
        summary = f"trained {config.train.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        if evals:
            summary += f", eval loss {evals[-1]:.3f}"
        print(summary + f"; metrics in {config.resolved_run_dir() / 'metrics.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxscale.bench import add_parser as add_bench
    from jaxscale.cost.cli import add_parser as add_estimate
    from jaxscale.data.tokenizer_cli import add_parser as add_tokenizer
    from jaxscale.scaling.cli import add_parser as add_scaling

    parser = argparse.ArgumentParser(prog="jaxscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (default: a small model on built-in text)")
    add_config_arguments(train)
    add_distributed_arguments(train)
    train.set_defaults(func=run_train)
    add_bench(commands)
    add_estimate(commands)
    add_scaling(commands)
    add_tokenizer(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxscale.cost.catalog import CatalogError
    from jaxscale.data import DataError
    from jaxscale.errors import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CatalogError) as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
