"""`jaxscale bench`: the training step of an experiment, timed honestly.

It builds the same trainer `jaxscale train` uses and feeds it the same data loader; there is no benchmark-only
step. Steps are timed in windows that end with a device sync, so asynchronous dispatch cannot flatter the
numbers, and the median window is reported.

Timing starts only after the warm-up has also run for `warmup_s` seconds: a GPU runs at its top clock until the
board's power average reaches the cap (a second or two), and windows timed right after compiling read faster
than sustained ones (BENCHMARKS.md, History). A training run lives at the sustained clock, so that is what is
reported.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path

import jax

from jaxscale.config import Config
from jaxscale.distributed import any_process
from jaxscale.errors import ConfigError
from jaxscale.kernels import traced_kernels
from jaxscale.trace_summary import summarize
from jaxscale.training import build_trainer
from jaxscale.training.batches import batch_shard, to_global
from jaxscale.training.loop import open_dataset
from jaxscale.training.metrics import device_peak_flops


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()  # None on the CPU
    return stats.get("peak_bytes_in_use") if stats else None


ACCELERATOR_WARMUP_S = 10.0  # several times the power-cap settling time measured
# Profiled steps follow the last window's sync and the profiler's start, an idle moment in which a power-capped
# GPU's clock recovers: the first steps after it run faster than sustained ones. More steps come nearer the
# sustained clock; the kernels' shares change little.
PROFILE_STEPS = 3


def check_bench_arguments(*, warmup: int, windows: int, steps_per_window: int, profile_dir: str | None,
                          profile_steps: int, warmup_s: float | None = None) -> None:
    """Refuse counts that leave nothing to time, and a trace folder that cannot be written, before anything is
    built."""
    if warmup < 0:
        raise ConfigError(f"warmup={warmup}: warm-up steps cannot be negative (--warmup 0 or more)")
    if warmup_s is not None and not (warmup_s >= 0 and math.isfinite(warmup_s)):
        raise ConfigError(f"warmup_s={warmup_s}: the warm-up time must be a finite number of seconds, 0 or more "
                          f"(--warmup-s 0 or more)")
    if windows < 1:
        raise ConfigError(f"windows={windows}: time at least one window (--windows 1 or more)")
    if steps_per_window < 1:
        raise ConfigError(f"steps_per_window={steps_per_window}: time at least one step per window "
                          f"(--steps-per-window 1 or more)")
    if profile_dir is not None:
        if profile_steps < 1:
            raise ConfigError(f"profile_steps={profile_steps}: trace at least one step "
                              f"(--profile-steps 1 or more)")
        if Path(profile_dir).exists() and not Path(profile_dir).is_dir():
            raise ConfigError(f"--profile {profile_dir} is a file; give a folder for the trace")
        _check_can_create(Path(profile_dir), "--profile")


def check_out_file(out: str, force: bool) -> None:
    """`--out` must be a file that can be written, and not one already there unless --force says so."""
    path = Path(out)
    if not out or path.is_dir():
        raise ConfigError(f"--out {out!r} is " + ("empty" if not out else "a folder")
                          + f"; give a file such as {path / 'bench.json' if out else 'bench.json'}")
    if path.exists() and not force:
        raise ConfigError(f"--out {out} exists; add --force to replace it, or give another file")
    _check_can_create(path, "--out")


def _check_can_create(path: Path, option: str) -> None:
    """The nearest folder of `path` that exists must be one this user can write into (it creates the rest)."""
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, so nothing can be created inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable by this user")


def run_bench(config: Config, *, warmup: int = 5, warmup_s: float | None = None, windows: int = 5,
              steps_per_window: int = 10, profile_dir: str | None = None,
              profile_steps: int = PROFILE_STEPS) -> dict:
    """warmup_s: the least time the warm-up runs (cycling its batches); None: ACCELERATOR_WARMUP_S off the CPU,
    none on it (a CPU's clock does not wait on a power average). profile_dir: also trace `profile_steps` steps
    there (under process_<i>/ when there are several processes); the result's "profile" says where their device
    time went (`trace_summary`)."""
    check_bench_arguments(warmup=warmup, windows=windows, steps_per_window=steps_per_window,
                          profile_dir=profile_dir, profile_steps=profile_steps, warmup_s=warmup_s)
    if warmup_s is None:
        warmup_s = 0.0 if jax.default_backend() == "cpu" else ACCELERATOR_WARMUP_S
    warmup = max(1, warmup)
    trainer = build_trainer(config)
    t = config.train
    dataset, shard = open_dataset(config), batch_shard(trainer.data_sharding, t.batch_size)
    step_count = warmup + windows * steps_per_window
    # Batches are read before timing: the loader's own speed is measured by experiments/data_loader_bench.py.
    batches = [to_global(dataset.batch(i, t.batch_size, **shard), trainer.data_sharding, t.batch_size)
               for i in range(step_count)]
    state = trainer.init_state()

    start = time.perf_counter()
    with traced_kernels() as attention_kernels:  # what each layer's attention chose while the step was traced
        compiled = trainer.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start

    start, warmup_steps, warming = time.perf_counter(), 0, True
    while warming:  # rounds of `warmup` steps until warmup_s has passed
        for i in range(warmup):
            state, metrics = compiled(state, batches[i])
        jax.block_until_ready(metrics)  # the clock reads time run, not time queued
        warmup_steps += warmup
        # every process runs as many steps (each step holds collectives): on while any one's time is not up
        warming = any_process(time.perf_counter() - start < warmup_s)
    warmed_s = time.perf_counter() - start
    window_s = []
    for w in range(windows):
        start = time.perf_counter()
        for i in range(steps_per_window):
            state, metrics = compiled(state, batches[warmup + w * steps_per_window + i])
        jax.block_until_ready(metrics)
        window_s.append((time.perf_counter() - start) / steps_per_window)

    profile = None
    if profile_dir:
        if jax.process_count() > 1:  # each process traces only its own devices
            profile_dir = str(Path(profile_dir) / f"process_{jax.process_index()}")
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):  # Perfetto opens the .json.gz
            for i in range(profile_steps):
                state, metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready(metrics)
        profile = summarize(profile_dir, profile_steps)

    step_s = statistics.median(window_s)
    tokens_per_s = t.batch_size * config.model.seq_len / step_s
    peak = device_peak_flops()
    return {
        "experiment": config.name,
        "model": config.model.style,
        "n_layers": config.model.n_layers,  # the size itself: a --set model.preset=... keeps the experiment's name
        "d_model": config.model.d_model,
        "params_m": round(trainer.model.param_count() / 1e6, 1),
        "batch": t.batch_size,
        "seq_len": config.model.seq_len,
        "mesh": dict(trainer.mesh.shape),
        "document_masking": config.data.document_masking,
        "attention_kernel": ",".join(sorted(set(attention_kernels))) or None,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "step_s": step_s,
        "step_s_windows": window_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
        "mfu": tokens_per_s * config.model.flops_per_token() / (peak * jax.device_count()) if peak else None,
        "flops_per_token": config.model.flops_per_token(),
        "compile_s": compile_s,
        "warmup_steps": warmup_steps,
        "warmup_s": warmed_s,
        "peak_memory_gb": (lambda b: b / 1e9 if b else None)(peak_memory_bytes()),
        "final_loss": float(metrics["loss"]),
        "jax": jax.__version__,
        "process_index": jax.process_index(),
        "profile_steps": profile_steps if profile is not None else None,
        "profile": [dataclasses.asdict(device) for device in profile] if profile is not None else None,
    }
