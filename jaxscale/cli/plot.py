"""`jaxscale plot RUN_DIR ...`: training curves of runs as a PNG (jaxscale.training.curves), one summary line each."""
from __future__ import annotations

import argparse
from pathlib import Path

from jaxscale.run_files import is_url
from jaxscale.training import curves
from jaxscale.training.curves import curves_figure, read_runs, save_figure, summary_line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plot` on the core CLI's subparsers; the handler is `args.func(args) -> exit code`."""
    p = subparsers.add_parser("plot", help="training curves of runs (loss, held-out loss, tokens/s) as a PNG",
                              description=curves.__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png for one run in a local "
                                            "directory, curves.png here for several or a gs:// one)")
    p.add_argument("--x", choices=["step", "tokens"], default="step",
                   help="x axis; tokens compares runs with different batch sizes")
    p.add_argument("--smooth", type=float, default=0.6, help="moving-average weight for the loss, 0 to 1 "
                                                             "(default 0.6; 0: raw)")
    p.set_defaults(func=run_plot)
    return p


def run_plot(args: argparse.Namespace) -> int:
    one_local = len(args.run_dirs) == 1 and not is_url(args.run_dirs[0])
    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if one_local else Path("curves.png"))
    runs = read_runs(args.run_dirs)
    path = save_figure(curves_figure(runs, x=args.x, smooth=args.smooth), out, "--out")
    for run in runs:
        print(summary_line(run))
    print(f"wrote {path}")
    return 0
