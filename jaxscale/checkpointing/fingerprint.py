"""A fingerprint of every array of the training state, computed where the arrays live.

Saved with each checkpoint and recomputed after a restore: a restored array that differs from the saved one
in any element (a flipped bit that the file formats did not catch, a shard read into the wrong place while
resharding) changes its fingerprint. The arithmetic is on integers modulo 2**32, so the result does not
depend on how the array is sharded or in which order the devices add up their parts: a checkpoint written
on 8 devices verifies on 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _bits(x: jax.Array) -> jax.Array:
    """The bit pattern of each element as uint32."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    if x.dtype.itemsize > 4:
        raise TypeError(f"cannot fingerprint {x.dtype} arrays: 64-bit types are not used in the state")
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _fingerprint(x: jax.Array) -> jax.Array:
    # Odd weights are invertible modulo 2**32: changing any single element always changes the sum, and the
    # position in the weight catches elements that are all there but in the wrong places.
    weights = _flat_index(x.shape) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(_bits(x) * weights, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)


def _in_device_memory(x: jax.Array) -> jax.Array:
    """A host-memory array (train.offload_optimizer) copied to device memory, where it can be summed:
    computations refuse operands of both memory kinds."""
    sharding = getattr(x, "sharding", None)
    if getattr(sharding, "memory_kind", None) == "pinned_host":
        return jax.device_put(x, sharding.with_memory_kind("device"))
    return x


@jax.jit
def _summaries(state) -> tuple[list[jax.Array], jax.Array]:
    leaves = jax.tree.leaves(state)
    return [_fingerprint(x) for x in leaves], jnp.all(jnp.stack([_finite(x) for x in leaves]))


def leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def summarize(state) -> tuple[dict[str, int], bool]:
    """({leaf path: fingerprint}, whether every floating-point element is finite). Waits for the state."""
    fingerprints, finite = jax.device_get(_summaries(jax.tree.map(_in_device_memory, state)))
    return {path: int(fp) for path, fp in zip(leaf_paths(state), fingerprints)}, bool(finite)
