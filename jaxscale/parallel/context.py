"""Context parallelism: the sequence split over the `context` mesh axis, attention over all-gathered keys.

With C context ranks the sequence is cut into 2C chunks and rank i holds chunks i and 2C - 1 - i (the model
reorders the tokens so, `balanced_order`, and puts them back before the output head). Under a causal mask a
query sees the keys before it, so an early chunk has little work and a late one much; pairing them gives every
rank the same number of (query, key) pairs that the mask keeps (`kept_pairs_per_rank`), which is what a
kernel that skips masked blocks spends its time on.

Each rank gathers the keys, values, segment ids and positions of the whole sequence over the context axis
(one all-gather per layer, its transpose a reduce-scatter of their gradients) and attends its own queries to
them block by block (`blockwise_attention`: an online softmax over key blocks, masked by the tokens' positions
in the original order and their documents, blocks no query sees skipped), so no (length x length) mask or
score matrix is ever made and memory grows linearly with the length. Ring attention would pass the keys round
instead of holding them all; the gathered keys take (length x kv_heads x head_dim) per rank, which stays small
against the activations at 32k tokens.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jaxscale.parallel.blockwise_attention import blockwise_attention
from jaxscale.sharding import current_activation_rules, logical_to_spec, rule_axes

CONTEXT_AXIS = "context"
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


def context_ranks() -> int:
    """How many ranks the traced activation rules split the sequence over (1 outside them)."""
    context = current_activation_rules()
    if context is None:
        return 1
    mesh, rules = context
    return int(np.prod([mesh.shape[a] for a in rule_axes(logical_to_spec(("length",), rules, mesh)[0])]))


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                      segment_ids: jax.Array | None) -> jax.Array:
    """Causal attention with the length split over the context axis: q (batch, length, heads, head_dim), k, v
    (batch, length, kv_heads, head_dim), positions and segment_ids (batch, length), all in the model's
    (reordered) token order."""
    mesh, rules = current_activation_rules()
    q_spec, kv_spec = logical_to_spec(Q_AXES, rules, mesh), logical_to_spec(KV_AXES, rules, mesh)
    row_spec = PartitionSpec(q_spec[0], q_spec[1])
    length_axes = tuple(rule_axes(q_spec[1]))

    def gather(x):
        return jax.lax.all_gather(x, length_axes, axis=1, tiled=True)

    def on_device(q, k, v, positions, *segments):
        segment_ids = segments[0] if segments else None
        return blockwise_attention(q, gather(k), gather(v), positions, gather(positions), segment_ids,
                                   None if segment_ids is None else gather(segment_ids))

    segments = () if segment_ids is None else (segment_ids,)
    in_specs = (q_spec, kv_spec, kv_spec, row_spec) + (row_spec,) * len(segments)
    # check_vma off: the online softmax starts from constants that its key blocks then make vary over ranks
    return jax.shard_map(on_device, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
        q, k, v, positions, *segments)
