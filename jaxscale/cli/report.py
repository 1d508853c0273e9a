"""`jaxscale report RUN_DIR`: a run in a few lines, from what it left in its directory (metrics.jsonl,
goodput.jsonl, summary.json, config.yaml); no JAX is loaded."""
from __future__ import annotations

import argparse

from jaxscale.training.report import report


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="a run in a few lines: steps, tokens, loss, goodput, stragglers, "
                                             "cost and energy", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> int:
    print(report(args.run_dir))
    return 0
