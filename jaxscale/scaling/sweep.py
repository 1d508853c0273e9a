"""A scaling sweep: train every model shape x token budget of a grid, one run directory each, and record each
run's (N, D, final loss) in <run_dir>/scaling.json for `jaxscale scaling fit`.

Every run has its own learning-rate schedule (warmup, then cosine decay to the run's own last step), as the
Chinchilla fits require: a run cut short of its schedule's end would look worse than it is. Each run keeps only
its newest checkpoint (enough to resume an interrupted run, and a bounded use of disk).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxscale.scaling.points import SCALING_FILE, ScalingPoint, final_loss, read_point, write_point

log = logging.getLogger("jaxscale.scaling")


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_layers: int
    head_dim: int

    @property
    def n_heads(self) -> int:
        return max(1, self.d_model // self.head_dim)

    @property
    def name(self) -> str:
        return f"d{self.d_model}-l{self.n_layers}"

    @classmethod
    def parse(cls, text: str, head_dim: int) -> ModelShape:
        """'64x2' -> d_model 64, 2 layers."""
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"model size {text!r} must look like D_MODELxLAYERS, e.g. 64x2")
        d_model, n_layers = int(match[1]), int(match[2])
        if d_model < 1 or n_layers < 1 or (d_model >= head_dim and d_model % head_dim):
            raise ValueError(f"model size {text!r}: d_model must be positive and a multiple of the head size "
                             f"{head_dim}, and layers positive")
        return cls(d_model, n_layers, head_dim)


@dataclass(frozen=True)
class SweepPreset:
    shapes: tuple[str, ...]  # D_MODELxLAYERS
    tokens: tuple[float, ...]  # token budgets
    head_dim: int
    overrides: tuple[str, ...]  # config keys every run of the preset sets
    about: str


PRESETS: dict[str, SweepPreset] = {
    # 4 sizes x 4 budgets = 16 runs of 122-977 steps at 2048 tokens/step. On the default experiment (byte-level
    # built-in text) it took 27 minutes on a 2-core machine busy with other work (16.5 CPU-minutes of user time).
    # A demonstration of the tools more than a scaling law: on that ~2M-token corpus the eval loss of the 2-4 layer
    # models falls faster than a power law in D from ~1M tokens on (d128x4: 2.35 at 1M tokens, 1.79 at 2M), and
    # the fit's holdout error on the largest run was +22%.
    "cpu": SweepPreset(
        shapes=("32x1", "64x2", "96x3", "128x4"), tokens=(0.25e6, 0.5e6, 1e6, 2e6), head_dim=32,
        overrides=("model.seq_len=128", "train.batch_size=16", "train.eval_batches=16", "train.log_every=10",
                   "train.progress=false", "checkpoint.keep_last=1"),
        about="tiny models for a CPU: d_model 32-128, 1-4 layers, 0.25M-2M tokens"),
    # 5 sizes x 4 budgets, 16M-253M matmul parameters with a 50k vocabulary, 50M-400M tokens: 2.4e18 training
    # FLOPs, 1.7 h on one H100 at MFU 0.4 (the small models will reach less). Use it with an experiment whose data
    # has at least 400M tokens: repeated data bends the law.
    "gpu": SweepPreset(
        shapes=("256x4", "384x6", "512x8", "768x12", "1024x16"), tokens=(50e6, 100e6, 200e6, 400e6), head_dim=64,
        overrides=("model.seq_len=1024", "train.batch_size=64", "train.eval_batches=32", "train.log_every=50",
                   "train.progress=false", "checkpoint.keep_last=1"),
        about="GPT-2-like sizes for one GPU: d_model 256-1024, 4-16 layers, 50M-400M tokens"),
}


@dataclass(frozen=True)
class SweepRun:
    shape: ModelShape
    tokens: float  # the budget asked for; the run trains steps x tokens_per_step, the nearest whole step count
    steps: int
    run_dir: Path
    config: Any  # the run's jaxscale Config, loaded (and so checked) when the sweep is planned

    @property
    def n(self) -> float:
        return float(self.config.model.matmul_params())

    @property
    def d(self) -> float:
        return float(self.steps * self.config.train.batch_size * self.config.model.seq_len)


def plan_sweep(experiment: str | None, preset: SweepPreset, shapes: list[ModelShape], budgets: list[float],
               out: Path, overrides: list[str]) -> list[SweepRun]:
    """One run per shape x budget. Later overrides win: preset, then the user's --set, then the grid's own.
    Every run's config is loaded here, so a bad one fails before any training starts."""
    from jaxscale.config import load_config

    base = [*preset.overrides, *overrides]
    probe = load_config(experiment, base)  # for the tokens per step after the overrides
    tokens_per_step = probe.train.batch_size * probe.model.seq_len
    runs = []
    for shape in shapes:
        for budget in budgets:
            steps = max(1, round(budget / tokens_per_step))
            run_dir = out / f"{shape.name}-t{_tokens_label(budget)}"
            grid = (f"model.d_model={shape.d_model}", f"model.n_layers={shape.n_layers}",
                    f"model.n_heads={shape.n_heads}", "model.n_kv_heads=null", "model.d_ff=null",
                    f"train.steps={steps}", f"train.eval_every={steps}",  # evaluate exactly once, at the end
                    f"optimizer.warmup_steps={max(10, steps // 20)}",
                    f"name={run_dir.name}", f"run_dir={run_dir}")
            runs.append(SweepRun(shape, budget, steps, run_dir, load_config(experiment, [*base, *grid])))
    return runs


def run_sweep(runs: list[SweepRun]) -> list[ScalingPoint]:
    """Train each run not already done (a run directory with scaling.json is kept as it is) and record it."""
    from jaxscale import train

    points = []
    for i, run in enumerate(runs, start=1):
        done = run.run_dir / SCALING_FILE
        if done.is_file():
            log.info("[%d/%d] %s: done already (%s), skipped", i, len(runs), run.run_dir, done)
            points.append(read_point(done))
            continue
        started = time.perf_counter()
        result = train(run.config)
        point = point_from_run(run.config, result.metrics)
        write_point(point)
        log.info("[%d/%d] %s: N=%d D=%d loss=%.4f (%s) in %.0f s", i, len(runs), run.run_dir, point.N, point.D,
                 point.loss, point.loss_kind, time.perf_counter() - started)
        points.append(point)
    return points


def point_from_run(config, metrics_rows: list[dict]) -> ScalingPoint:
    """The scaling point of a finished run of `config` (a jaxscale Config) that logged `metrics_rows`."""
    m, t = config.model, config.train
    loss, kind = final_loss(metrics_rows)
    return ScalingPoint(N=float(m.matmul_params()), D=float(t.steps * t.batch_size * m.seq_len), loss=loss,
                        loss_kind=kind, total_params=int(m.total_params()), flops_per_token=float(m.flops_per_token()),
                        run_dir=str(config.resolved_run_dir()))


def _tokens_label(tokens: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"
