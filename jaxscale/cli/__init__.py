"""The `jaxscale` command: train, and the tools around training (bench, estimate, plot, scaling, tokenizer,
export, compile, tpu, plan, report).

One module per command family holds its flags and its printing; the library modules they call hold the logic
and no argparse. Errors a user can fix are printed here, once, as one line and an exit code.
"""
from __future__ import annotations

import argparse
import logging
import sys

from jaxscale.checkpointing import CheckpointError
from jaxscale.cli import bench, estimate, export, plan, plot, report, scaling, tokenizer, tpu, train
from jaxscale.cli import compile as compile_command
from jaxscale.cost.catalog import CatalogError
from jaxscale.data import DataError
from jaxscale.errors import ConfigError
from jaxscale.platforms import skip_absent_tpu
from jaxscale.scaling.sweep import SweepFailed
from jaxscale.training.loop import EXIT_DIVERGED, TrainingDiverged

# What each error a user can act on exits with; its message is printed as one line, without a traceback.
EXIT_CODES: dict[type[Exception], int] = {
    TrainingDiverged: EXIT_DIVERGED,
    ConfigError: 2, DataError: 2, CatalogError: 2, CheckpointError: 2,
    SweepFailed: 1,  # the runs that failed are named, with their logs; the others are kept
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxscale", description=__doc__.partition("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_parser(commands)
    train.add_presets_parser(commands)
    bench.add_parser(commands)
    compile_command.add_parser(commands)
    estimate.add_parser(commands)
    plot.add_parser(commands)
    scaling.add_parser(commands)
    tokenizer.add_parser(commands)
    export.add_parser(commands)
    plan.add_parser(commands)
    tpu.add_parser(commands)
    report.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except tuple(EXIT_CODES) as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return next(code for error, code in EXIT_CODES.items() if isinstance(e, error))
