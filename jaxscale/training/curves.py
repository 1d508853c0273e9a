"""Training curves of one or more runs, read from their metrics.jsonl: the loss (smoothed, with the held-out loss)
and the throughput against steps or tokens, with restarts and rollbacks marked, written to a PNG.
On the command line: `jaxscale plot RUN_DIR [RUN_DIR ...]`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from etils import epath

from jaxscale.errors import ConfigError
from jaxscale.extras import require
from jaxscale.figures import figure_path
from jaxscale.run_files import absolute, run_path
from jaxscale.training.events import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Events drawn as vertical lines: (line style, legend label).
MARKED_EVENTS = {"resume": ("--", "resumed"), "rollback": (":", "rolled back"), "preempted": ("-.", "preempted")}


@dataclass
class RunCurves:
    name: str
    tokens_per_step: int
    steps: np.ndarray  # of the training rows
    loss: np.ndarray
    eval_steps: np.ndarray
    eval_loss: np.ndarray
    tokens_per_s: np.ndarray  # NaN where a row has no timing (a session's first row includes compiling)
    events: list[tuple[int, str]]  # (step, event) of MARKED_EVENTS, in order
    skipped_updates: int


def read_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """A run's curves, each step once across restarts (`read_metrics`). Tokens per step come from the run's
    config.yaml (global batch x sequence length; an elastic restart keeps the global batch)."""
    run_dir = run_path(run_dir, "RUN_DIR")
    if not run_dir.is_dir():
        raise ConfigError(f"no run directory {run_dir}: give the run_dir of a jaxscale train run (e.g. runs/default)")
    try:
        rows = read_metrics(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot plot {run_dir}: {e}") from e
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} has no training rows yet: plot it once the run has "
                          f"logged a step (train.log_every sets how often)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} is missing: jaxscale train writes it into the run directory; plot the "
                          f"directory that holds both metrics.jsonl and config.yaml")
    eval_rows = [r for r in rows if "eval_loss" in r]
    metrics_path = run_dir / "metrics.jsonl"
    return RunCurves(
        name=name or run_dir.name,
        tokens_per_step=_tokens_per_step(config_path),
        steps=np.array([r["step"] for r in train_rows]),
        loss=_column(train_rows, "loss", metrics_path),
        eval_steps=np.array([r["step"] for r in eval_rows]),
        eval_loss=_column(eval_rows, "eval_loss", metrics_path),
        tokens_per_s=_column(train_rows, "tokens_per_s", metrics_path),
        events=[(r["step"], r["event"]) for r in rows if r.get("event") in MARKED_EVENTS],
        skipped_updates=sum(r.get("event") == "update_skipped" for r in rows),
    )


def _tokens_per_step(config_path: epath.Path) -> int:
    """Global batch x sequence length from a run's config.yaml."""
    try:
        config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path} is not valid YAML: {e}") from e
    try:
        sizes = [config["train"]["batch_size"], config["model"]["seq_len"]]
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{config_path} is not the config.yaml of a jaxscale train run: it gives no "
                          f"train.batch_size and model.seq_len") from e
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ConfigError(f"{config_path}: train.batch_size and model.seq_len must be positive whole numbers, "
                          f"got {sizes[0]!r} and {sizes[1]!r}")
    return sizes[0] * sizes[1]


def _column(rows: list[dict], key: str, path: epath.Path) -> np.ndarray:
    """The values of `key` as floats, NaN where null or absent (a row without timing)."""
    for row in rows:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{path}: step {row['step']} has {key} {value!r}, not a number: this file was not "
                              f"written by jaxscale train as it is")
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def smoothed(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average, debiased so the first points are not pulled towards zero. A non-finite value
    (a step whose update the guards skipped) is left out: NaN there, the average goes on without it."""
    out, average, count = np.full(len(values), np.nan), 0.0, 0
    for i, value in enumerate(values):
        if np.isfinite(value):
            average, count = weight * average + (1 - weight) * value, count + 1
            out[i] = average / (1 - weight ** count)
    return out


def read_runs(run_dirs: list[str | Path]) -> list[RunCurves]:
    """Each run named by the last parts of its path that tell it from the others (runs/a/run, runs/b/run ->
    a/run, b/run)."""
    paths = [absolute(run_path(d, "RUN_DIR")) for d in run_dirs]
    twice = sorted({str(d) for d, p in zip(run_dirs, paths) if paths.count(p) > 1})
    if twice:  # names could not tell the copies apart
        raise ConfigError(f"run directory {', '.join(twice)} given more than once; give each run once")
    depth = 1
    while depth < max(len(p.parts) for p in paths) and len({p.parts[-depth:] for p in paths}) < len(paths):
        depth += 1
    return [read_run(d, "/".join(p.parts[-depth:])) for d, p in zip(run_dirs, paths)]


def plot_runs(run_dirs: list[str | Path], path: str | Path, x: str = "step", smooth: float = 0.6) -> Path:
    """Write the curves of `run_dirs` to `path` (PNG): loss above, tokens/s below, one colour per run.
    x: "step" or "tokens" (compares runs with different batch sizes); smooth: EMA weight in [0, 1)."""
    return save_figure(curves_figure(read_runs(run_dirs), x, smooth), path)


def curves_figure(runs: list[RunCurves], x: str = "step", smooth: float = 0.6, fig: Figure | None = None) -> Figure:
    """The figure of `plot_runs`, drawn on `fig` if given: in a notebook pass `plt.figure(figsize=(9, 7))`, which
    the notebook then shows."""
    if x not in ("step", "tokens"):
        raise ConfigError(f"x={x!r}: plot against 'step' or 'tokens'")
    if not 0 <= smooth < 1:
        raise ConfigError(f"smooth={smooth}: the moving-average weight must be in [0, 1) (0: no smoothing)")
    # no pyplot: nothing changes the backend of a notebook that imports this
    matplotlib = require("matplotlib", "plot", "drawing training curves")
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(9, 7), dpi=110)
    ax_loss, ax_speed = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colours = matplotlib.colormaps["tab10"]
    labelled_events: set[str] = set()
    for i, run in enumerate(runs):
        colour = colours(i % 10)
        scale = run.tokens_per_step if x == "tokens" else 1
        marker = "o" if len(run.steps) == 1 else None  # a line through one point draws nothing
        ax_loss.plot(run.steps * scale, run.loss, color=colour, alpha=0.25, lw=0.8)
        ax_loss.plot(run.steps * scale, smoothed(run.loss, smooth), color=colour, lw=1.8, marker=marker,
                     label=f"{run.name} train")
        if len(run.eval_steps):
            ax_loss.plot(run.eval_steps * scale, run.eval_loss, "o-", color=colour, ms=5, lw=1,
                         markeredgecolor="black", label=f"{run.name} held out")
        ax_speed.plot(run.steps * scale, run.tokens_per_s, ".", color=colour, ms=3)
        for step, event in run.events:
            style, label = MARKED_EVENTS[event]
            ax_loss.axvline(step * scale, color=colour, ls=style, lw=1, alpha=0.7,
                            label=None if event in labelled_events else label)
            labelled_events.add(event)
    ax_loss.set_ylabel("loss (nats/token)")
    losses = np.concatenate([np.concatenate([r.loss, r.eval_loss]) for r in runs])
    losses = losses[np.isfinite(losses)]
    if len(losses):  # up to the 95th percentile: the first steps' high loss would flatten the rest
        low, high = float(losses.min()), float(np.percentile(losses, 95))
        margin = 0.05 * (high - low) or 0.05
        ax_loss.set_ylim(low - margin, high + margin)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8, framealpha=0.9)
    ax_loss.set_title("training curves" if len(runs) > 1 else f"training curves: {runs[0].name}")
    speeds = np.concatenate([r.tokens_per_s for r in runs])
    speeds = speeds[~np.isnan(speeds)]
    if len(speeds) and speeds.min() > 0 and speeds.max() > 10 * speeds.min():  # runs on different hardware
        ax_speed.set_yscale("log")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("tokens" if x == "tokens" else "step")
    ax_speed.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, option: str = "path") -> Path:
    """`option`: what the user called the path, for the error messages (e.g. "--out")."""
    path = figure_path(path, option, "curves.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def summary_line(run: RunCurves) -> str:
    line = f"{run.name}: {run.steps[-1]} steps, loss {run.loss[0]:.3f} -> {run.loss[-1]:.3f}"
    if len(run.eval_loss):
        finite = run.eval_loss[np.isfinite(run.eval_loss)]  # a diverged evaluation is no one's best
        line += f", held out {run.eval_loss[-1]:.3f}" + (f" (best {finite.min():.3f})" if len(finite) else "")
    if not np.isnan(run.tokens_per_s).all():
        line += f", median {np.nanmedian(run.tokens_per_s):,.0f} tokens/s"
    restarts = sum(event == "resume" for _, event in run.events)
    if restarts or run.skipped_updates:
        line += f"; restarts {restarts}, skipped updates {run.skipped_updates}"
    return line
