"""A seeded permutation of range(n), evaluated at any positions in O(1) memory.

A Feistel network is a bijection on a power-of-4 domain; cycle walking restricts it to [0, n).

This lets the loader shuffle all windows of a dataset of any size without materializing a permutation array:
window = permute(position_in_epoch, n, key_of(seed, epoch)).
"""
from __future__ import annotations

import numpy as np

from jaxscale.data.hashing import key_of, mix64

ROUNDS = 4


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """Images of `positions` (each in [0, n)) under the permutation of range(n) that `key` selects."""
    positions = np.asarray(positions, dtype=np.int64)
    if n <= 0 or (positions.size and (positions.min() < 0 or positions.max() >= n)):
        raise ValueError(f"positions must lie in [0, {n})")
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # the Feistel domain 4**half_bits is < 4n
    round_keys = [key_of(key, r) for r in range(ROUNDS)]
    x = positions.astype(np.uint64)
    outside = np.ones(x.shape, dtype=bool)
    while outside.any():
        # Cycle walking: re-apply the bijection of the larger domain until the value lands in [0, n).
        x[outside] = _feistel(x[outside], half_bits, round_keys)
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


def _feistel(x: np.ndarray, half_bits: int, round_keys: list[int]) -> np.ndarray:
    shift, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    left, right = x >> shift, x & mask
    for k in round_keys:
        left, right = right, left ^ (mix64(right ^ np.uint64(k)) & mask)
    return (left << shift) | right
