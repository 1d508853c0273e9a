"""Loader throughput on the CPU: PYTHONPATH=$PWD python experiments/data_loader_bench.py [--file PATH]

Measures, for the built-in corpus and for a 1 GB uint16 token file (generated in a temporary directory
and deleted afterwards unless --file is given): the one-time tokenize/split time into a fresh cache, and
the training tokens per second (batch_size * seq_len per batch) of Dataset.batch and of the Prefetcher.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from jaxscale.data.config import DataConfig
from jaxscale.data.dataset import Dataset, build_dataset
from jaxscale.data.prefetch import Prefetcher
from jaxscale.data.tokenizers import ByteTokenizer

GENERATED_BYTES = 1 << 30
MEAN_DOCUMENT_TOKENS = 2000


def write_random_token_file(path: str, n_bytes: int, seed: int = 0) -> None:
    """Byte ids (0..255) with an EOS on average every MEAN_DOCUMENT_TOKENS tokens, as flat uint16."""
    rng = np.random.default_rng(seed)
    eos = ByteTokenizer.eos_id
    remaining = n_bytes // 2
    with open(path, "wb") as f:
        while remaining:
            n = min(remaining, 1 << 26)
            tokens = rng.integers(0, 256, n, dtype=np.uint16)
            tokens[rng.integers(0, MEAN_DOCUMENT_TOKENS, n, dtype=np.uint16) == 0] = eos
            tokens.tofile(f)
            remaining -= n


def loader_rate(ds: Dataset, batch_size: int, min_seconds: float, depth: int | None) -> float:
    """Training tokens per second over at least min_seconds, after one warm-up batch."""
    ds.batch(0, batch_size)
    steps, start = 0, time.perf_counter()
    if depth is None:
        while time.perf_counter() - start < min_seconds:
            ds.batch(1 + steps, batch_size)
            steps += 1
    else:
        with Prefetcher(ds, 1, batch_size, depth=depth) as batches:
            for _ in batches:
                steps += 1
                if time.perf_counter() - start >= min_seconds:
                    break
    return steps * batch_size * ds.seq_len / (time.perf_counter() - start)


def bench_source(name: str, cfg: DataConfig, args: argparse.Namespace) -> None:
    cache_dir = tempfile.mkdtemp(prefix="jaxscale-bench-cache-")
    try:
        start = time.perf_counter()
        ds = build_dataset(cfg, args.seq_len, cache_dir=cache_dir)
        build_seconds = time.perf_counter() - start
        train_tokens = ds.num_windows() * (args.seq_len + 1)
        direct = loader_rate(ds, args.batch_size, args.seconds, depth=None)
        prefetched = loader_rate(ds, args.batch_size, args.seconds, depth=args.prefetch)
        print(f"{name}: {train_tokens / 1e6:,.1f}M training tokens; first build (tokenize, split, cache) "
              f"{build_seconds:.1f} s; Dataset.batch {direct / 1e6:,.1f}M tokens/s; "
              f"Prefetcher(depth={args.prefetch}) {prefetched / 1e6:,.1f}M tokens/s", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="a flat uint16 token file to use instead of a generated 1 GB one")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per loader")
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{datetime.date.today()}  {platform.machine()} {platform.processor() or platform.system()}, "
          f"{os.cpu_count()} CPUs; seq_len {args.seq_len}, batch {args.batch_size}", flush=True)

    bench_source("built-in corpus (bytes)", DataConfig(), args)
    tmp_dir = None
    path = args.file
    if path is None:
        tmp_dir = tempfile.mkdtemp(prefix="jaxscale-bench-")
        path = os.path.join(tmp_dir, "tokens.bin")
        start = time.perf_counter()
        write_random_token_file(path, GENERATED_BYTES)
        seconds = time.perf_counter() - start
        print(f"generated {path} ({GENERATED_BYTES >> 20} MiB) in {seconds:.1f} s", flush=True)
    try:
        size_mb = os.path.getsize(path) / 2**20
        bench_source(f"{path} ({size_mb:,.0f} MiB uint16)", DataConfig(source=f"tokens:{path}"), args)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
