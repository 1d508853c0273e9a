"""Context parallelism: the sequence split over the `context` mesh axis.

With C context ranks the sequence is cut into 2C chunks and rank i holds chunks i and 2C - 1 - i (the model
reorders the tokens so, `balanced_order`, and puts them back before the output head). Under a causal mask a
query sees the keys before it, so an early chunk has little work and a late one much; pairing them gives every
rank the same number of (query, key) pairs that the mask keeps (`kept_pairs_per_rank`), and the same number of
tiles computed by attention that skips the tiles the mask removes (`tiles_per_rank`).

Attention runs one of two ways (`model.context_attention`), both block by block (`blockwise_attention`: an
online softmax over tiles, masked by the tokens' positions in the original order and their documents, tiles
no query sees skipped), so no (length x length) mask or score matrix is ever made:

- allgather: each rank gathers the keys, values, segment ids and positions of the whole sequence over the
  context axis (one all-gather per layer, its transpose a reduce-scatter of the keys' and values' gradients)
  and attends its own queries to them. The gathered keys and values, (length x kv_heads x head_dim) each, stay
  on every rank until the backward.
- ring (the default): the keys and values go round the ranks with ppermute, C - 1 hand-overs, each rank
  holding one rank's span at a time (`ring_attention`); the backward sends them round again with their
  gradients. It holds 1 / C of the keys and values, and each hand-over can run while the rank computes on the
  span it has; it moves more bytes than the all-gather (1.6 x in float32, `bytes_moved_per_layer`).

On 8 simulated CPU devices (experiments/context_long_memory.py) the ring's train step needs 18-42% less
temporary memory at 8k-64k tokens (more where every head has its own keys) and takes about as long as the
all-gather's from 8k tokens on; the all-gather is quicker at 4k. BENCHMARKS.md has the numbers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxscale.parallel.blockwise_attention import BLOCK, blockwise_attention, key_block, tiles_computed
from jaxscale.parallel.ring_attention import ring_attention
from jaxscale.sharding import current_activation_rules, logical_to_spec, rule_axes

CONTEXT_AXIS = "context"
IMPLEMENTATIONS = ("allgather", "ring")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def balanced_order(length: int, ranks: int) -> np.ndarray:
    """The token order whose contiguous split over `ranks` gives rank i the chunks i and 2 x ranks - 1 - i."""
    chunks = np.arange(length).reshape(2 * ranks, length // (2 * ranks))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ranks - 1 - i]]) for i in range(ranks)])


def kept_pairs_per_rank(order: np.ndarray, ranks: int) -> list[int]:
    """(query, key) pairs a causal mask keeps on each rank when the tokens in `order` are split contiguously."""
    length = len(order)
    return [int(np.sum(order[r * length // ranks:(r + 1) * length // ranks] + 1)) for r in range(ranks)]


def chunk_block(length: int, ranks: int) -> int:
    """Queries and keys per tile: a divisor of the chunk (length / 2 x ranks), so no tile straddles two chunks
    and the tiles skipped follow the causal mask chunk by chunk."""
    return key_block(length // (2 * ranks), BLOCK)


def tiles_per_rank(order: np.ndarray, ranks: int, implementation: str) -> np.ndarray:
    """The tiles attention computes on each rank (rows) in each step (columns: one for allgather, C for ring,
    step s attending to the keys of rank r - s), one row of tokens in `order` split contiguously over the
    ranks, one document: what the kernels decide to compute (`blockwise_attention.tiles_computed`)."""
    length = len(order)
    spans = np.asarray(order).reshape(ranks, 1, length // ranks)
    block = chunk_block(length, ranks)
    blocks = (block, block)

    def tiles(q, k):
        return int(tiles_computed(jnp.asarray(q), jnp.asarray(k), jnp.zeros(q.shape, jnp.int32),
                                  jnp.zeros(k.shape, jnp.int32), blocks))

    if implementation == "allgather":
        return np.array([[tiles(spans[r], np.asarray(order)[None])] for r in range(ranks)])
    return np.array([[tiles(spans[r], spans[(r - s) % ranks]) for s in range(ranks)] for r in range(ranks)])


def bytes_moved_per_layer(length: int, ranks: int, kv_heads: int, head_dim: int, itemsize: int,
                          implementation: str, batch: int = 1) -> tuple[int, int]:
    """(forward, backward) bytes each rank receives in one layer's attention: keys and values of `itemsize`
    bytes, int32 positions and segment ids. allgather: the gather of all four, then a reduce-scatter of the
    keys' and values' gradients. ring: C - 1 hand-overs of all four in each pass, and C of the float32
    gradients in the backward."""
    span = batch * length // ranks  # tokens per rank
    kv, ids = 2 * kv_heads * head_dim * itemsize, 2 * 4  # per token
    forward = (ranks - 1) * span * (kv + ids)
    if implementation == "allgather":
        return forward, (ranks - 1) * span * kv
    return forward, forward + ranks * span * 2 * kv_heads * head_dim * 4


def context_ranks() -> int:
    """How many ranks the traced activation rules split the sequence over (1 outside them)."""
    context = current_activation_rules()
    if context is None:
        return 1
    mesh, rules = context
    return int(np.prod([mesh.shape[a] for a in rule_axes(logical_to_spec(("length",), rules, mesh)[0])]))


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                      segment_ids: jax.Array | None, implementation: str = "ring") -> jax.Array:
    """Causal attention with the length split over the context axis: q (batch, length, heads, head_dim), k, v
    (batch, length, kv_heads, head_dim), positions and segment_ids (batch, length), all in the model's
    (reordered) token order. `implementation`: allgather or ring (the module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"context attention {implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    mesh, rules = current_activation_rules()
    q_spec, kv_spec = logical_to_spec(Q_AXES, rules, mesh), logical_to_spec(KV_AXES, rules, mesh)
    row_spec = PartitionSpec(q_spec[0], q_spec[1])
    length_axes = tuple(rule_axes(q_spec[1]))
    ranks = int(np.prod([mesh.shape[a] for a in length_axes]))
    block = chunk_block(q.shape[1], ranks)
    if segment_ids is None:
        segment_ids = jnp.zeros_like(positions)

    def gathered(q, k, v, positions, segments):
        def gather(x):
            return jax.lax.all_gather(x, length_axes, axis=1, tiled=True)
        return blockwise_attention(q, gather(k), gather(v), positions, gather(positions), segments,
                                   gather(segments), block=block)

    def ring(q, k, v, positions, segments):
        return ring_attention(q, k, v, positions, segments, length_axes, ranks, (block, block))

    in_specs = (q_spec, kv_spec, kv_spec, row_spec, row_spec)
    # check_vma off: the online softmax starts from constants that its key blocks then make vary over ranks
    return jax.shard_map(gathered if implementation == "allgather" else ring, mesh=mesh, in_specs=in_specs,
                         out_specs=q_spec, check_vma=False)(q, k, v, positions, segment_ids)
