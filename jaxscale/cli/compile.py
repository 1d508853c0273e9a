"""`jaxscale compile --topology T`: the train step compiled for a TPU slice on this machine (jaxscale.tpu_compile)."""
from __future__ import annotations

import argparse

from jaxscale import tpu_compile
from jaxscale.cli.arguments import add_config_arguments
from jaxscale.config import load_config
from jaxscale.errors import ConfigError
from jaxscale.tpu_compile import DoesNotFit, compile_for_topology, format_report, parse_topology


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compile", help="compile the train step for a TPU slice here (no TPU needed: "
                                              "pip install 'jaxscale[tpu]'); per-chip memory, FLOPs, collectives",
                              description=tpu_compile.__doc__)
    add_config_arguments(p)
    p.add_argument("--topology", required=True, help="a Cloud TPU type (v5e-256, v5p-1024, v6e-256, v4-32) or "
                                                     "JAX's form (v5e:16x16)")
    p.add_argument("--slices", type=int, default=1, help="slices joined by the data-center network (multislice);"
                                                          " set mesh.dcn_* to lay axes across them")
    p.set_defaults(func=run_compile)
    return p


def run_compile(args: argparse.Namespace) -> int:
    """Exit code 0 when the step fits the chip's HBM, 1 when it does not, 2 for a bad config or topology."""
    if args.slices < 1:
        raise ConfigError(f"--slices {args.slices}: give the number of slices, >= 1")
    topology = parse_topology(args.topology)
    try:
        report = compile_for_topology(load_config(args.experiment, args.overrides), topology, args.slices)
    except DoesNotFit as e:
        print(f"DOES NOT FIT: {e}")
        return 1
    print(format_report(report))
    return 1 if report.fits is False else 0
