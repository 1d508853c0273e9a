"""`jaxscale bench`: the training step of an experiment, timed honestly.

It builds the same trainer `jaxscale train` uses and feeds it the same data loader; there is no benchmark-only
step. Steps are timed in windows that end with a device sync, so asynchronous dispatch cannot flatter the
numbers, and the median window is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax

from jaxscale.config import Config
from jaxscale.training import build_trainer
from jaxscale.training.loop import host_rank, open_dataset, to_global
from jaxscale.training.metrics import device_peak_flops


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()  # None on the CPU
    return stats.get("peak_bytes_in_use") if stats else None


def run_bench(config: Config, *, warmup: int = 5, windows: int = 5, steps_per_window: int = 10,
              profile_dir: str | None = None) -> dict:
    trainer = build_trainer(config)
    t = config.train
    dataset, rank = open_dataset(config), host_rank()
    step_count = warmup + windows * steps_per_window
    # Batches are read before timing: the loader's own speed is measured by the data benchmark.
    batches = [to_global(dataset.batch(i, t.batch_size, **rank), trainer.data_sharding) for i in range(step_count)]
    state = trainer.init_state()

    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start

    for i in range(warmup):
        state, metrics = compiled(state, batches[i])
    jax.block_until_ready(metrics)
    window_s = []
    for w in range(windows):
        start = time.perf_counter()
        for i in range(steps_per_window):
            state, metrics = compiled(state, batches[warmup + w * steps_per_window + i])
        jax.block_until_ready(metrics)
        window_s.append((time.perf_counter() - start) / steps_per_window)

    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):  # Perfetto opens the .json.gz
            for i in range(3):
                state, metrics = compiled(state, batches[i])
            jax.block_until_ready(metrics)

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
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "step_s": step_s,
        "step_s_windows": window_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
        "mfu": tokens_per_s * config.model.flops_per_token() / (peak * jax.device_count()) if peak else None,
        "flops_per_token": config.model.flops_per_token(),
        "compile_s": compile_s,
        "peak_memory_gb": (lambda b: b / 1e9 if b else None)(peak_memory_bytes()),
        "final_loss": float(metrics["loss"]),
        "jax": jax.__version__,
    }


def add_parser(subparsers) -> argparse.ArgumentParser:
    from jaxscale.cli import add_config_arguments

    p = subparsers.add_parser("bench", help="time the training step: tokens/s, MFU, memory, compile time")
    add_config_arguments(p)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--steps-per-window", type=int, default=10)
    p.add_argument("--profile", metavar="DIR", help="also write a trace of 3 steps (TensorBoard / Perfetto)")
    p.add_argument("--out", metavar="FILE", help="write the result as JSON here too")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from jaxscale.config import load_config

    config = load_config(args.experiment, args.overrides + ["train.progress=false"])
    result = run_bench(config, warmup=args.warmup, windows=args.windows, steps_per_window=args.steps_per_window,
                       profile_dir=args.profile)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return 0
