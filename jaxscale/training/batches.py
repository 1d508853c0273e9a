"""A global batch in a multi-process run: which rows each process reads, and its rows as one sharded array."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxscale.errors import ConfigError


def batch_shard(sharding: NamedSharding, batch_size: int) -> dict[str, int]:
    """Which rows of each global batch this process reads, as `Dataset.batch` / `Prefetcher` keyword arguments:
    the block of rows its devices hold. Processes whose devices hold the same rows (a tensor or pipeline axis
    that spans processes) read the same block."""
    held = sorted({(rows.start or 0, batch_size if rows.stop is None else rows.stop)
                   for rows, *_ in sharding.addressable_devices_indices_map((batch_size,)).values()})
    start, stop, gap = held[0][0], held[0][1], False
    for first, end in held[1:]:
        gap |= first > stop
        stop = max(stop, end)
    size = stop - start
    if gap or batch_size % size or start % size:
        raise ConfigError(f"this process's devices hold rows {held} of the batch of {batch_size}, not one block of "
                          f"a whole number of equal blocks; give each process adjacent positions on the batch "
                          f"axes (mesh.data / mesh.fsdp) or make train.batch_size a multiple of {size}")
    return dict(shard_index=start // size, shard_count=batch_size // size)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in batch.items()}
