"""`jaxscale scaling sweep` (train a grid of sizes x token budgets) and `jaxscale scaling fit` (fit L(N, D))."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from jaxscale.cli.arguments import add_config_arguments
from jaxscale.errors import ConfigError
from jaxscale.figures import figure_path
from jaxscale.scaling.plot import plot_scaling
from jaxscale.scaling.points import N_DEFINITION, SCALING_FILE, find_points, unfinished_runs
from jaxscale.scaling.sweep import (
    PRESETS,
    ModelShape,
    SweepRun,
    SweepStopped,
    parse_budgets,
    plan_sweep,
    run_sweep,
    run_sweep_parallel,
    worker_devices,
)
from jaxscale.training.preemption import EXIT_PREEMPTED


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `scaling` with its `sweep` and `fit` subcommands; handlers are `args.func(args) -> exit code`."""
    p = subparsers.add_parser("scaling", help="scaling-law sweeps and fits (Chinchilla approach 3)",
                              description=__doc__)
    commands = p.add_subparsers(dest="scaling_command", required=True)

    sweep = commands.add_parser(
        "sweep", help="train a grid of model sizes x token budgets, one run directory each",
        description="Train every size x token budget, each run with its own LR schedule, and write "
                    "<run_dir>/scaling.json (N, D, final eval loss). Finished runs are skipped, so an "
                    "interrupted sweep resumes. Presets: "
                    + "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    add_config_arguments(sweep)  # the overrides reach every run
    sweep.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="grid and run settings (default cpu)")
    sweep.add_argument("--sizes", metavar="DxL,...", help="model sizes as d_model x layers, e.g. 32x1,64x2 "
                                                         "(default: the preset's)")
    sweep.add_argument("--tokens", metavar="T,...", help="token budgets, e.g. 2.5e5,1e6 (default: the preset's)")
    sweep.add_argument("--out", metavar="DIR", help="parent of the run directories (default: runs/scaling-PRESET)")
    sweep.add_argument("--workers", type=int, default=1, metavar="N",
                       help="train up to N runs at once, each in its own process on one GPU (CUDA_VISIBLE_DEVICES "
                            "= its worker slot), largest runs first, output in <run_dir>/sweep.log; use the GPU "
                            "count (default 1: one run after another in this process)")
    sweep.add_argument("--dry-run", action="store_true", help="print the planned runs and stop")
    sweep.set_defaults(func=run_sweep_command)

    fit = commands.add_parser(
        "fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to sweep runs",
        description="Fit the Chinchilla approach-3 law (Huber loss on log-loss, delta 1e-3, L-BFGS from a grid "
                    f"of starts) to the runs' scaling.json. N: {N_DEFINITION}; D: tokens trained.")
    fit.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                     help="run directories with scaling.json, or a sweep's --out directory")
    fit.add_argument("--holdout", action="store_true",
                     help="leave out the largest-compute run, fit the rest, and compare prediction with it")
    fit.add_argument("--budget", type=float, metavar="FLOPS",
                     help="compute budget for the optimal N and D (default: the largest run's 6ND)")
    fit.add_argument("--bootstrap", type=int, default=200, metavar="K",
                     help="bootstrap resamples for uncertainties (default 200; 0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--png", metavar="PATH", default="scaling_fit.png", help="figure (default scaling_fit.png)")
    fit.set_defaults(func=run_fit_command)
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    try:
        devices = worker_devices(args.workers)  # checked before planning: a bad count fails at once
        shapes = [ModelShape.parse(s, preset.head_dim) for s in (args.sizes.split(",") if args.sizes is not None
                                                                 else preset.shapes)]
        budgets = parse_budgets(args.tokens) if args.tokens is not None else list(preset.tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    out = Path(args.out or f"runs/scaling-{args.preset}")
    runs = plan_sweep(args.experiment, preset, shapes, budgets, out, args.overrides)
    print(f"{len(runs)} runs in {out} (N = {N_DEFINITION}):")
    for r in runs:
        print(f"  {r.run_dir.name:24s} N={r.n:12,.0f}  D={r.d:14,.0f}  steps={r.steps:6d}  C=6ND={6 * r.n * r.d:.3g}")
    if args.dry_run:
        return 0
    try:
        if args.workers == 1:
            run_sweep(runs)
        else:
            run_sweep_parallel(runs, devices, lambda run: child_command(args, run))
    except (SweepStopped, KeyboardInterrupt) as e:  # a signal; the runs in progress saved a checkpoint
        print(f"jaxscale scaling sweep: stopped{f' ({e})' if isinstance(e, SweepStopped) else ''}; rerun the same "
              f"command to continue (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"done; fit with: jaxscale scaling fit {out} --holdout")
    return 0


def child_command(args: argparse.Namespace, run: SweepRun) -> list[str]:
    """The command that trains exactly `run` (a SweepRun) of this sweep in a process of its own: this command
    for its one size and budget, with the same experiment, preset, --out and --set, so it plans the same run
    directory and config as the sequential sweep."""
    out = args.out or f"runs/scaling-{args.preset}"
    command = [sys.executable, "-m", "jaxscale.cli", "scaling", "sweep"]
    if args.experiment is not None:
        command.append(args.experiment)
    # KEY=VALUE forms: a value starting with '-' is not read as an option
    command += [f"--preset={args.preset}", f"--sizes={run.shape.d_model}x{run.shape.n_layers}",
                f"--tokens={run.tokens!r}", f"--out={out}", "--workers=1"]
    return command + [f"--set={override}" for override in args.overrides]


def run_fit_command(args: argparse.Namespace) -> int:
    # scipy (the scaling extra) loads when a fit runs: every other command works without it
    from jaxscale.scaling.fit import bootstrap, fit_loss_law, holdout_largest

    try:  # the options first: the fit and its bootstrap can take minutes
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap {args.bootstrap}: give the number of resamples, >= 0 (0: none)")
        if args.budget is not None and not 0 < args.budget < math.inf:
            raise ValueError(f"--budget {args.budget}: give a compute budget in FLOPs, a positive number such as "
                             f"1e20 (default: the largest run's)")
        png_path = figure_path(args.png, "--png", "scaling_fit.png")
        points = find_points(args.run_dirs)
        n = np.array([p.N for p in points])
        d = np.array([p.D for p in points])
        loss = np.array([p.loss for p in points])
        fit = fit_loss_law(n, d, loss)
        holdout = holdout_largest(n, d, loss) if args.holdout else None
        if args.bootstrap:
            print(f"bootstrap: refitting {args.bootstrap} resamples of the {len(points)} runs...", flush=True)
        boot = bootstrap(n, d, loss, resamples=args.bootstrap, seed=args.seed, full_fit=fit) if args.bootstrap else None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    kinds = sorted({p.loss_kind for p in points})
    budget = args.budget if args.budget is not None else float(max(6 * n * d))
    law = fit.law
    print(f"fitted on {len(points)} runs; N = {N_DEFINITION}; D = tokens trained; loss = final {'/'.join(kinds)} loss")
    unfinished = unfinished_runs(args.run_dirs)
    if unfinished:  # a sweep still running, stopped or with failed runs
        print(f"  note: left out {len(unfinished)} run(s) with no {SCALING_FILE} yet: "
              f"{', '.join(str(r) for r in unfinished)}")
    if "train" in kinds:
        print("  note: some runs logged no eval loss; their final training loss was used")
    print(f"L(N, D) = E + A/N^alpha + B/D^beta   (sum of Huber losses {fit.objective:.3g})")
    values = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "a": law.n_exponent}
    for key, value in values.items():
        label = "a = beta/(alpha+beta)" if key == "a" else key
        line = f"  {label:22s} {value:10.4g}"
        if boot:
            c = boot.constants[key]
            line += (f"   ± {c.std:.3g} (bootstrap std), {100 * boot.confidence:.0f}% interval "
                     f"[{c.low:.4g}, {c.high:.4g}] over {len(boot.samples)} resamples")
        print(line)
    n_opt, d_opt = law.compute_optimal(budget)
    print(f"compute-optimal at C = {budget:.3g} FLOPs"
          f"{'' if args.budget is not None else ' (the largest run; set --budget)'}: "
          f"N = {n_opt:.4g}, D = {d_opt:.4g} ({d_opt / n_opt:.3g} tokens per parameter), "
          f"predicted loss {float(law.loss(n_opt, d_opt)):.4f}")
    if boot:
        n_low, n_high = boot.interval_of([b.compute_optimal(budget)[0] for b in boot.laws()])
        print(f"  N_opt {100 * boot.confidence:.0f}% bootstrap interval [{n_low:.4g}, {n_high:.4g}]; "
              f"D_opt [{budget / 6 / n_high:.4g}, {budget / 6 / n_low:.4g}]")
    if holdout:
        print(f"holdout: fitted without the largest-compute run (N={holdout.n:.4g}, D={holdout.d:.4g}); "
              f"predicted loss {holdout.predicted:.4f}, actual {holdout.actual:.4f}, "
              f"relative error {100 * holdout.relative_error:+.2f}%")
    png = plot_scaling(n, d, loss, law, png_path, budget=budget,
                       holdout=(holdout.n, holdout.d, holdout.actual, holdout.predicted) if holdout else None,
                       title=f"Scaling law fit, {len(points)} runs (Chinchilla approach 3)")
    print(f"figure: {png}")
    return 0
