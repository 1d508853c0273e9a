"""The on-disk cache of tokenized sources: one directory per (source content, tokenizer, split) key.

A directory is built under a temporary name and renamed into place when complete, so a killed process never
leaves a partial cache that a later run would use; concurrent builders (several hosts or processes) each
build and the first rename wins. An interrupted build leaves a `.partial-*` directory that nothing reads;
delete it at will. A changed source gets a new directory; old ones stay until deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from jaxscale.data.config import DataConfig
from jaxscale.data.errors import DataError
from jaxscale.data.preprocess import SPLITS, stream_dtype, write_splits
from jaxscale.data.sources import Source, source_fingerprint
from jaxscale.data.tokenizers import Tokenizer

CACHE_FORMAT = 1  # bump when the stream layout changes, so old caches are not misread
CACHE_ENV = "JAXSCALE_CACHE"
META_FILE = "meta.json"


def resolve_cache_dir(cache_dir: str | None = None) -> str:
    """The argument if given, else $JAXSCALE_CACHE, else ~/.cache/jaxscale/data."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jaxscale", "data")
    return os.path.abspath(os.path.expanduser(chosen))


@dataclass(frozen=True)
class TokenStreams:
    """The packed token streams of one source, memory-mapped from its cache directory."""
    directory: str
    train: np.ndarray
    validation: np.ndarray
    meta: dict


def cache_key(source: Source, tokenizer: Tokenizer, cfg: DataConfig, validation_fraction: float) -> str:
    parts = [CACHE_FORMAT, source.kind, source_fingerprint(source, cfg), tokenizer.fingerprint,
             validation_fraction]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_or_build(source: Source, tokenizer: Tokenizer, cfg: DataConfig, validation_fraction: float,
                  cache_dir: str) -> TokenStreams:
    """Open the cached streams of `source`, tokenizing it first if no cache matches its current content."""
    key = cache_key(source, tokenizer, cfg, validation_fraction)
    name = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', source.spec).strip('_')[-48:]}-{key[:20]}"
    directory = os.path.join(cache_dir, name)
    if not os.path.isdir(directory):
        _build(source, tokenizer, cfg, validation_fraction, cache_dir, directory, key)
    return _open(directory)


def _build(source: Source, tokenizer: Tokenizer, cfg: DataConfig, validation_fraction: float,
           cache_dir: str, directory: str, key: str) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".partial-{os.path.basename(directory)}-", dir=cache_dir)
    try:
        counts = write_splits(source, tokenizer, cfg, validation_fraction, tmp)
        meta = {"format": CACHE_FORMAT, "key": key, "source": source.spec, "tokenizer": tokenizer.fingerprint,
                "dtype": stream_dtype(tokenizer.vocab_size).name, "validation_fraction": validation_fraction,
                **counts}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, directory)
        except OSError:
            if not os.path.isdir(directory):  # not the benign race with another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(directory: str) -> TokenStreams:
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for split in SPLITS:
        path = os.path.join(directory, f"{split}.bin")
        expected = meta[f"{split}_tokens"]
        if os.path.getsize(path) != expected * dtype.itemsize:
            raise DataError(f"cache file {path} has the wrong size (damaged or copied partially); "
                            f"delete {directory} and it is rebuilt")
        # np.memmap cannot map an empty file; an empty split is an empty array
        streams[split] = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
    return TokenStreams(directory, streams["train"], streams["validation"], meta)
