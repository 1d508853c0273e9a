"""The on-disk cache of tokenized sources: one directory per (source content, tokenizer, split) key.

A directory is built under a temporary name and renamed into place when complete, so a killed process never
leaves a partial cache that a later run would use; concurrent builders (several hosts or processes) each
build and the first rename wins. An interrupted build leaves a `.partial-*` directory that nothing reads;
delete it at will. A changed source gets a new directory; old ones stay until deleted. A directory damaged
later (meta.json missing or garbled, a stream file missing or of the wrong size) is rebuilt, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
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

log = logging.getLogger("jaxscale")

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
    if os.path.isdir(directory):
        try:
            return _open(directory, key)
        except DamagedCache as e:
            log.warning("token cache %s is damaged (%s); rebuilding it", directory, e)
            _discard(directory, cache_dir)
    _build(source, tokenizer, cfg, validation_fraction, cache_dir, directory, key)
    return _open(directory, key)


class DamagedCache(DataError):
    """A cache directory that does not read back as it was built."""


def _discard(directory: str, cache_dir: str) -> None:
    """Move a damaged cache directory out of the way in one rename, then delete it: another process that found it
    damaged too, or already rebuilt it, makes the rename fail, and then there is nothing to do."""
    aside = tempfile.mkdtemp(prefix=f".damaged-{os.path.basename(directory)}-", dir=cache_dir)
    try:
        os.rename(directory, os.path.join(aside, "cache"))
    except OSError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


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


def _open(directory: str, key: str) -> TokenStreams:
    """The streams of a built cache directory; DamagedCache says what is wrong with one that is not intact."""
    try:
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise DamagedCache(f"{META_FILE} is missing") from e
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise DamagedCache(f"{META_FILE} is unreadable: {e}") from e
    counts = [meta.get(f"{split}_tokens") for split in SPLITS] if isinstance(meta, dict) else []
    if (not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key
            or meta.get("dtype") not in ("uint16", "uint32")
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise DamagedCache(f"{META_FILE} does not describe this cache")
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for split, expected in zip(SPLITS, counts):
        path = os.path.join(directory, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != expected * dtype.itemsize:
            raise DamagedCache(f"{split}.bin is " + ("missing" if size is None else
                                                     f"{size} bytes, not the {expected * dtype.itemsize} built"))
        # np.memmap cannot map an empty file; an empty split is an empty array
        streams[split] = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
    return TokenStreams(directory, streams["train"], streams["validation"], meta)
