"""A scaling sweep: train every model shape x token budget of a grid, one run directory each, and record each
run's (N, D, final loss) in <run_dir>/scaling.json for `jaxscale scaling fit`.

Every run has its own learning-rate schedule (warmup, then cosine decay to the run's own last step), as the
Chinchilla fits require: a run cut short of its schedule's end would look worse than it is. Each run keeps only
its newest checkpoint (enough to resume an interrupted run, and a bounded use of disk).

Runs go one after another in this process (`run_sweep`), or several at once (`run_sweep_parallel`), each in a
child process of its own pinned to one GPU, its output in <run_dir>/sweep.log.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jaxscale.errors import ConfigError
from jaxscale.scaling.points import SCALING_FILE, ScalingPoint, final_loss, read_point, write_point
from jaxscale.training.events import read_metrics

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


def parse_budgets(text: str) -> list[float]:
    """'2.5e5,1e6' -> [250000.0, 1000000.0]."""
    budgets = []
    for part in text.split(","):
        try:
            budget = float(part)
        except ValueError:
            budget = math.nan
        if not 0 < budget < math.inf:  # NaN fails this too
            raise ValueError(f"token budget {part.strip()!r} in --tokens {text!r} must be a positive number, e.g. "
                             f"--tokens 2.5e5,1e6")
        budgets.append(budget)
    return budgets


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
    # 5 sizes x 3 budgets = 15 runs of 763-3052 steps at 32,768 byte tokens per step: 3M-85M matmul parameters,
    # 25M-100M tokens, 2.3e17 training FLOPs in all (6N + 12LdT per token). Measured: 11 minutes on 2 H200s with
    # --workers 2, the largest run 226 s (BENCHMARKS.md). Byte tokens need no tokenizer file; the
    # data must hold at least 100M tokens (bytes) of training text, or the largest runs repeat data and bend the
    # law: experiments/scaling_gpu.sh builds such a corpus from the machine's Python sources.
    "gpu": SweepPreset(
        shapes=("256x4", "384x6", "512x8", "640x10", "768x12"), tokens=(25e6, 50e6, 100e6), head_dim=64,
        overrides=("data.tokenizer=bytes", "model.vocab_size=257", "model.seq_len=1024", "train.batch_size=32",
                   "optimizer.learning_rate=1e-3", "data.document_masking=false",  # cuDNN flash attention
                   "train.eval_batches=16", "train.log_every=50", "train.progress=false",
                   "checkpoint.keep_last=1"),
        about="byte-level models for 1-4 GPUs: d_model 256-768, 4-12 layers, 25M-100M tokens"),
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
    planned: dict[Any, str] = {}  # a run directory, or a (shape, steps): the run planned there
    for shape in shapes:
        for budget in budgets:
            steps = round(budget / tokens_per_step)
            if steps < 1:
                raise ConfigError(f"token budget {budget:g} rounds to 0 steps of {tokens_per_step} tokens "
                                  f"(train.batch_size x model.seq_len); give larger --tokens")
            run_dir = out / f"{shape.name}-t{_tokens_label(budget)}"
            for key in (run_dir, (shape, steps)):  # one run trained twice, or two processes in one directory
                if key in planned:
                    raise ConfigError(f"--sizes/--tokens plan one run twice: {planned[key]} and {run_dir.name} "
                                      f"(token budget {budget:g}) are both {shape.name} for {steps} steps; give "
                                      f"each size once and token budgets at least one step ({tokens_per_step} "
                                      f"tokens) apart")
                planned[key] = f"{run_dir.name} (token budget {budget:g})"
            grid = (f"model.d_model={shape.d_model}", f"model.n_layers={shape.n_layers}",
                    f"model.n_heads={shape.n_heads}", "model.n_kv_heads=null", "model.d_ff=null",
                    f"train.steps={steps}", f"train.eval_every={steps}",  # evaluate exactly once, at the end
                    f"optimizer.warmup_steps={max(10, steps // 20)}",
                    f"name={run_dir.name}", f"run_dir={run_dir}")
            runs.append(SweepRun(shape, budget, steps, run_dir, load_config(experiment, [*base, *grid])))
    return runs


def recorded_point(run: SweepRun) -> ScalingPoint | None:
    """The point of a run finished earlier (its scaling.json), which a sweep keeps as it is; None if not done."""
    done = run.run_dir / SCALING_FILE
    if not done.is_file():
        return None
    log.info("%s: done already (%s), skipped", run.run_dir, done)
    try:
        return read_point(done)
    except ValueError as e:
        raise ConfigError(f"{e}; delete that file and rerun to record the run again from its metrics.jsonl") from e


class SweepStopped(Exception):
    """A run was stopped by SIGTERM / SIGINT after saving a checkpoint; rerunning the sweep continues it."""


def run_sweep(runs: list[SweepRun]) -> list[ScalingPoint]:
    """Train each run not already done (a run directory with scaling.json is kept as it is) and record it."""
    from jaxscale import train

    points = []
    for i, run in enumerate(runs, start=1):
        recorded = recorded_point(run)
        if recorded is not None:
            points.append(recorded)
            continue
        started = time.perf_counter()
        result = train(run.config)
        if result.preempted:  # stopped part way by SIGTERM / SIGINT: its loss is not the run's, so no point
            raise SweepStopped(f"{run.run_dir} stopped at step {int(result.state.step)} of {run.steps} by a "
                               "signal, after saving a checkpoint")
        # From the run's whole log: a run killed after its final checkpoint but before scaling.json trains
        # nothing when rerun, and its earlier sessions logged the losses
        try:
            point = point_from_run(run.config, read_metrics(run.run_dir / "metrics.jsonl"))
        except ValueError as e:
            raise ConfigError(f"{run.run_dir}: no scaling point: {e}") from e
        write_point(point)
        log.info("[%d/%d] %s: N=%d D=%d loss=%.4f (%s) in %.0f s", i, len(runs), run.run_dir, point.N, point.D,
                 point.loss, point.loss_kind, time.perf_counter() - started)
        points.append(point)
    return points


SWEEP_LOG = "sweep.log"  # a parallel sweep's child writes its stdout and stderr here, in its run directory
POLL_S = 0.5  # how often the parent looks for finished children; runs take seconds to minutes


class SweepFailed(Exception):
    """Runs of a parallel sweep failed; the message names them and their logs. The other runs are recorded."""


@dataclass
class _Child:
    run: SweepRun
    slot: int  # worker slot, 0..workers-1
    process: subprocess.Popen
    log_path: Path
    started: float


def run_sweep_parallel(runs: list[SweepRun], devices: list[str],
                       child_command: Callable[[SweepRun], list[str]]) -> list[ScalingPoint]:
    """Train the runs not already done, one per worker at once, each by `child_command(run)` (a command that
    trains exactly that run, as `run_sweep` would) in its own process with CUDA_VISIBLE_DEVICES=devices[worker]
    (see `worker_devices`). The largest-compute runs start first, so the workers finish at about the same time.
    Raises SweepFailed, once every run has ended, if any child failed; the runs that succeeded are recorded."""
    if not devices:
        raise ValueError("a parallel sweep needs at least one worker device")
    workers = len(devices)
    points: dict[Path, ScalingPoint] = {}
    pending = []
    for run in runs:
        recorded = recorded_point(run)
        if recorded is not None:
            points[run.run_dir] = recorded
        else:
            pending.append(run)
    if pending:
        prepare_data(pending)
    queue = sorted(pending, key=lambda r: 6 * r.n * r.d, reverse=True)  # longest first: the workers end together
    free = list(range(workers))
    running: list[_Child] = []
    failed: list[str] = []
    finished = len(runs) - len(pending)
    log.info("%d runs to train, %d at once (%d done already)", len(pending), workers, finished)
    previous_handler = _interrupt_on_sigterm()
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                running.append(_start_child(queue.pop(0), child_command, slot, devices[slot]))
            child = _wait_for_one(running)
            running.remove(child)
            free.append(child.slot)
            finished += 1
            seconds = time.perf_counter() - child.started
            point_file = child.run.run_dir / SCALING_FILE
            code = child.process.returncode
            if code == 0 and point_file.is_file():
                point = points[child.run.run_dir] = read_point(point_file)
                log.info("[%d/%d] %s: loss=%.4f (%s) in %.0f s (worker %d)", finished, len(runs),
                         child.run.run_dir.name, point.loss, point.loss_kind, seconds, child.slot)
            else:
                why = f"exit code {code}" if code else f"exit code 0 but no {SCALING_FILE}"
                failed.append(f"{child.run.run_dir.name} ({why}; log: {child.log_path})")
                log.error("[%d/%d] %s: FAILED (%s) after %.0f s; log: %s", finished, len(runs),
                          child.run.run_dir.name, why, seconds, child.log_path)
    finally:
        _stop_children(running)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(pending)} runs failed: {'; '.join(failed)}. The other runs are "
                          "recorded; see the logs, then rerun the same command to retry only the failed runs")
    return [points[run.run_dir] for run in runs]


def worker_devices(workers: int) -> list[str]:
    """Each worker slot's CUDA_VISIBLE_DEVICES: the slot index, or where this process already has a
    CUDA_VISIBLE_DEVICES (a scheduler's allocation, e.g. SLURM's) the slot-th GPU of that list."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (runs trained at once, e.g. the GPU count), got {workers}")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return [str(slot) for slot in range(workers)]
    if workers > len(visible):
        raise ValueError(f"--workers {workers}, but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
                         f"lists {len(visible)} GPUs; use at most {len(visible)} workers (one GPU each)")
    return visible[:workers]


def prepare_data(runs: list[SweepRun]) -> None:
    """Tokenize the runs' data into the cache here, once, before any worker starts; otherwise every worker
    would tokenize the same source at the same time (the cache stays correct, but that is N-1 wasted builds)."""
    from jaxscale.data import build_dataset

    seen = set()
    for run in runs:  # the grid changes only the model and schedule, so this is one build in practice
        key = (repr(run.config.data), run.config.model.seq_len)
        if key not in seen:
            seen.add(key)
            log.info("preparing the data (tokenized once into the cache) before starting the workers")
            build_dataset(run.config.data, run.config.model.seq_len)


def _start_child(run: SweepRun, child_command: Callable[[SweepRun], list[str]], slot: int,
                 device: str) -> _Child:
    command = child_command(run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / SWEEP_LOG
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": device, "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as log_file:  # appended: a retried run keeps the log of its failed attempt
        _write_header(log_file, f"CUDA_VISIBLE_DEVICES={device} {shlex.join(command)}")
        # A session of its own: a Ctrl-C at the terminal reaches only this process, which then sends each child
        # one SIGTERM (save a checkpoint and exit). A second signal would stop a child without saving.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    log.info("started %s on worker %d (CUDA_VISIBLE_DEVICES=%s); log: %s", run.run_dir.name, slot, device,
             log_path)
    return _Child(run, slot, process, log_path, time.perf_counter())


def _write_header(log_file: IO[str], command: str) -> None:
    log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n")
    log_file.flush()  # before the child writes to the same file


def _wait_for_one(running: list[_Child]) -> _Child:
    while True:
        for child in running:
            if child.process.poll() is not None:
                return child
        time.sleep(POLL_S)


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM stop this process as Ctrl-C does (children asked to save and stop, then waited for), not
    leave them running orphaned. Returns the previous handler, or None where signals cannot be handled here."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return signal.signal(signal.SIGTERM, interrupt)


def _stop_children(running: list[_Child]) -> None:
    """After an error or Ctrl-C in this process: ask the children still running to save and stop, and wait."""
    for child in running:
        if child.process.poll() is None:
            log.warning("stopping %s (SIGTERM: it saves a checkpoint; rerun the sweep to continue it)",
                        child.run.run_dir.name)
            child.process.send_signal(signal.SIGTERM)
    for child in running:
        child.process.wait()


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
