"""The scaling-law figure: measured loss against compute coloured by model size, fitted curves, and the
compute-optimal frontier, written to a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxscale.extras import require
from jaxscale.figures import figure_path
from jaxscale.scaling.law import LossLaw


def plot_scaling(n, d, loss, law: LossLaw, path: str | Path, budget: float | None = None,
                 holdout: tuple[float, float, float, float] | None = None, title: str = "") -> Path:
    """Write the figure to `path`. `holdout` is (N, D, actual loss, loss predicted by a fit without that run)."""
    # no pyplot: nothing changes the backend of a notebook that imports this
    matplotlib = require("matplotlib", "plot", "drawing the scaling-law figure")
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    compute = 6 * n * d
    c_lo = compute.min() / 2
    c_hi = max(compute.max() * 2, (budget or 0) * 1.5)
    sizes = np.unique(n)
    norm = LogNorm(vmin=sizes.min(), vmax=sizes.max() * (1.0001 if len(sizes) == 1 else 1))
    cmap = matplotlib.colormaps["viridis"]

    fig = Figure(figsize=(9, 6), dpi=120)
    ax = fig.subplots()
    for size in sizes:  # each size's fitted loss as its token count grows: L(N, C / 6N)
        c = np.geomspace(c_lo, c_hi, 200)
        ax.plot(c, law.loss(size, c / (6 * size)), color=cmap(norm(size)), lw=1.2, alpha=0.8)
    ax.scatter(compute, loss, c=n, cmap=cmap, norm=norm, s=45, edgecolors="black", linewidths=0.6, zorder=3)
    ax.plot([], [], "o", color="lightgray", markeredgecolor="black", label="measured runs (colour: N)")
    if holdout:
        c_held = 6 * holdout[0] * holdout[1]
        ax.scatter([c_held], [holdout[2]], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=4,
                   label="largest-compute run (holdout check)")
        ax.scatter([c_held], [holdout[3]], marker="x", s=90, color="red", linewidths=2, zorder=4,
                   label=f"its loss predicted without it ({100 * (holdout[3] / holdout[2] - 1):+.1f}%)")

    frontier_c = np.geomspace(c_lo, c_hi, 200)
    frontier_loss = law.loss(*law.compute_optimal(frontier_c))
    ax.plot(frontier_c, frontier_loss, "k--", lw=2, label="compute-optimal frontier")
    if budget:
        nb, db = law.compute_optimal(budget)
        lb = float(law.loss(nb, db))
        ax.scatter([budget], [lb], marker="*", s=260, color="orange", edgecolors="black", zorder=5,
                   label=f"budget {budget:.2g} FLOPs: N={_si(nb)}, D={_si(db)}, L={lb:.3f}")

    ax.set_xscale("log")  # loss stays linear: its range is narrow, and a log axis would leave it unlabelled
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel("final loss (nats/token)")
    shown = np.concatenate([loss, [holdout[3]] if holdout else []])
    low, high = min(shown.min(), frontier_loss.min()), shown.max()
    ax.set_ylim(low - 0.08 * (high - low), high + 0.1 * (high - low))
    ax.set_xlim(c_lo, c_hi)
    ax.grid(True, which="major", alpha=0.3)
    colorbar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    colorbar.set_label("N (matmul parameters)")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    law_text = (f"L = {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}\n"
                f"N_opt ∝ C^{law.n_exponent:.3f},  D_opt ∝ C^{1 - law.n_exponent:.3f}")
    ax.text(0.02, 0.03, law_text, transform=ax.transAxes, fontsize=9, family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    ax.set_title(title or "Scaling law fit (Chinchilla approach 3)")
    fig.tight_layout()
    path = figure_path(path, "path", "scaling_fit.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
