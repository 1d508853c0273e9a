"""Table lookups (token and position embeddings) and their gradient, computed without a scatter.

The gradient of `table[ids]` sums the incoming rows of every id into that id's table row. As a scatter-add it
serializes on repeated ids (frequent words, byte-level text: a large share of a GPT-2 step on a GPU); as a
one-hot matmul it costs 2 x tokens x vocab x d tensor-core FLOPs (BENCHMARKS.md, History). Here the
rows are sorted by id instead, so that each id's rows are neighbours, and each id's sum is the difference of two
running sums over the sorted rows: a sort, a blocked prefix sum (small matmuls with a triangular matrix) and two
gathers, whatever the id distribution, and deterministic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscale.sharding import activation_split, constrain

PREFIX_BLOCK = 128  # rows summed per triangular matmul; the block totals are then summed cumulatively


def prefix_sums(rows: jax.Array) -> jax.Array:
    """(n, d) -> (n + 1, d) float32, entry i the sum of the first i rows."""
    n, d = rows.shape
    padded = jnp.pad(rows, ((0, -n % PREFIX_BLOCK), (0, 0))).reshape(-1, PREFIX_BLOCK, d)
    lower = jnp.tri(PREFIX_BLOCK, dtype=rows.dtype)  # exact in any dtype: entries are 0 and 1
    within = jnp.einsum("ij,bjd->bid", lower, padded, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)  # float32 rows must not be rounded to TF32
    totals = within[:, -1]
    before = jnp.cumsum(totals, axis=0) - totals  # sum of all earlier blocks
    sums = (within + before[:, None]).reshape(-1, d)[:n]
    return jnp.concatenate([jnp.zeros((1, d), jnp.float32), sums])


def sum_rows_by_id(ids: jax.Array, rows: jax.Array, n_ids: int) -> jax.Array:
    """ids (n,), rows (n, d) -> (n_ids, d) float32: row v is the sum of the rows whose id is v (0 if none).

    Float32 running sums over up to n rows: an id's sum is exact to about 1e-7 of the running total's size."""
    order = jnp.argsort(ids)
    sorted_ids = ids[order]
    running = prefix_sums(rows[order])
    ends = jnp.searchsorted(sorted_ids, jnp.arange(n_ids, dtype=ids.dtype), side="right",
                            method="scan_unrolled")
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    return running[ends] - running[starts]


@jax.custom_vjp
def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] for ids of shape (batch, length); the gradient sums rows by id as described above."""
    return table[ids]


def _lookup_forward(table, ids):
    return table[ids], (table, ids)


def _lookup_backward(residuals, grad):
    table, ids = residuals
    # Each device sums its own part of the batch (the groups follow the batch's sharding), then the per-group
    # tables add up across devices like any other gradient.
    groups = activation_split("batch")
    d = grad.shape[-1]
    grouped_ids = constrain(ids.reshape(groups, -1), ("batch", None))
    grouped_rows = constrain(grad.reshape(groups, -1, d), ("batch", None, "embed"))
    sums = jax.vmap(sum_rows_by_id, in_axes=(0, 0, None))(grouped_ids, grouped_rows, table.shape[0])
    sums = constrain(sums, ("batch", "vocab", "embed"))
    return sums.sum(0).astype(table.dtype), None


embedding_lookup.defvjp(_lookup_forward, _lookup_backward)
