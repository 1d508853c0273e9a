"""Stateless weighted mixing: which source serves global row g, and how many rows it served before.

Rows are grouped in blocks of BLOCK_ROWS. Every block gives each source the same number of rows (its
weight's share, rounded by largest remainder) in the same seeded order, so the source of row g and its
running count are closed-form: no state, any row computable directly, and the weights hold exactly over
every block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxscale.data.errors import DataError
from jaxscale.data.permutation import permute

BLOCK_ROWS = 4096


@dataclass(frozen=True)
class MixtureSchedule:
    rows_per_block: np.ndarray  # (sources,) rows each source serves per block
    source_of_slot: np.ndarray  # (BLOCK_ROWS,) the source serving each row of a block
    rank_of_slot: np.ndarray  # (BLOCK_ROWS,) how many earlier rows of the block the same source served

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global rows: the source index, and that source's own row counter (0, 1, 2, ...)."""
        block, slot = np.divmod(np.asarray(rows, dtype=np.int64), BLOCK_ROWS)
        source = self.source_of_slot[slot]
        return source, block * self.rows_per_block[source] + self.rank_of_slot[slot]


def make_schedule(specs: Sequence[str], weights: Sequence[float], key: int) -> MixtureSchedule:
    share = np.asarray(weights, dtype=np.float64)
    share = share / share.sum() * BLOCK_ROWS
    rows = np.floor(share).astype(np.int64)
    by_remainder = np.argsort(-(share - rows), kind="stable")
    rows[by_remainder[: BLOCK_ROWS - rows.sum()]] += 1
    for spec, n in zip(specs, rows):
        if n == 0:
            raise DataError(f"data.mixture weight of {spec!r} is below 1/{BLOCK_ROWS} of the total; "
                            "raise it or drop the source")
    source_of_slot = np.repeat(np.arange(len(rows)), rows)[permute(np.arange(BLOCK_ROWS), BLOCK_ROWS, key)]
    rank_of_slot = np.empty(BLOCK_ROWS, dtype=np.int64)
    for source in range(len(rows)):
        slots = np.flatnonzero(source_of_slot == source)
        rank_of_slot[slots] = np.arange(len(slots))
    return MixtureSchedule(rows, source_of_slot, rank_of_slot)
