"""Deterministic 64-bit hashing shared by the shuffle and the train/validation split.

Everything here is defined by explicit arithmetic, not by a library's random stream, so the same data and seed
give the same batches on every machine and numpy version.
"""
from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche mix of uint64 values (wraps modulo 2**64)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping is intended; numpy only warns for 0-d values
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key_of(*parts: object) -> int:
    """A 64-bit key from any printable parts, e.g. key_of(seed, "train", spec, epoch)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def text_hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"jaxscale-doc").digest()
    return int.from_bytes(digest, "little")


def validation_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: those whose uint64 hash is in the lowest `fraction` of the range."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if fraction >= 1.0:
        return np.ones(hashes.shape, dtype=bool)
    return hashes < np.uint64(int(fraction * 2.0**64))
