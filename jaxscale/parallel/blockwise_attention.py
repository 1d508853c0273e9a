"""Attention tile by tile with an online softmax, in plain JAX: no (queries x keys) mask or score matrix is ever
whole, only one (query block x key block) tile at a time, so memory grows linearly with the length.

The mask comes from each token's position in the original sequence (causal: a key at or before the query) and
its document (segment id), so the queries and keys may be in any order, as context parallelism's balanced
chunks put them. The forward keeps the output and the log-sum-exp of each query's scores; the backward walks
the tiles again and recomputes each tile's probabilities from them (flash attention's backward), so nothing per
tile is stored between the passes. A tile that no query of it may see (all its keys after every query, or no
document in common) is skipped in both passes. The queries are cut into blocks as the keys are, so what is
skipped follows the causal mask: with context parallelism's balanced chunks every rank then computes the same
number of tiles (`tiles_computed`).

The pieces (`start`, `attend`, `finish`, `gradients`) work on the keys one span at a time, carrying the online
softmax's state between spans: `blockwise_attention` hands them all the keys at once, ring attention
(jaxscale.parallel.ring_attention) the span that has reached its rank. Everything is computed in float32 and
the output is cast back to the queries' dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 512  # keys (and queries) per block; the largest divisor of the length up to this is used
_LOWEST = jnp.finfo(jnp.float32).min


def key_block(length: int, most: int = BLOCK) -> int:
    """The largest divisor of `length` that is at most `most`."""
    return next(b for b in range(min(most, length), 0, -1) if length % b == 0)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                        q_segments: jax.Array | None = None, k_segments: jax.Array | None = None,
                        block: int = BLOCK) -> jax.Array:
    """Causal attention of q (batch, queries, heads, head_dim) to k, v (batch, keys, kv_heads, head_dim): a query
    sees the keys whose position is at most its own and, with segment ids (batch, queries) / (batch, keys), only
    those of its document. Positions are (batch, queries) and (batch, keys). Query head i uses KV head
    i // (heads / kv_heads). `block`: queries and keys per block at most."""
    if (q_segments is None) != (k_segments is None):
        raise ValueError("give segment ids for both the queries and the keys, or for neither")
    if q_segments is None:
        q_segments, k_segments = jnp.zeros_like(q_positions), jnp.zeros_like(k_positions)
    blocks = (key_block(q.shape[1], block), key_block(k.shape[1], block))
    return _attention(q, k, v, q_positions, k_positions, q_segments, k_segments, blocks)


# ----------------------------------------------------------------------------------------------------------
# The pieces: queries grouped by KV head, (b, kv_heads, groups, queries, head_dim), in float32


def grouped(x: jax.Array, kv_heads: int, scale: float = 1.0) -> jax.Array:
    """(b, t, heads, d) -> (b, kv_heads, groups, t, d) in float32, times `scale`."""
    b, t, h, d = x.shape
    x = x.astype(jnp.float32) * scale
    return x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def ungrouped(x: jax.Array, dtype) -> jax.Array:
    b, k, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d).astype(dtype)


def start(qg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's state before any key: (running max, running sum, weighted values) per query."""
    shape = qg.shape[:-1]
    return jnp.full(shape, _LOWEST), jnp.zeros(shape), jnp.zeros(qg.shape)


def finish(state, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the output (b, queries, heads, head_dim) in `dtype`, the float32 grouped output and log-sum-exp that
    `gradients` takes)."""
    m, total, acc = state
    out = acc / total[..., None]  # every query sees itself, so total > 0
    return ungrouped(out, dtype), out, m + jnp.log(total)


def attend(state, qg, q_positions, q_segments, k, v, k_positions, k_segments, blocks: tuple[int, int]):
    """The state after the keys k, v (b, keys, kv_heads, d) too. qg: the queries grouped and scaled by
    head_dim^-0.5; `blocks`: (queries, keys) per block, dividing their lengths."""
    keys = tuple(_blocks(a, blocks[1]) for a in (k, v, k_positions, k_segments))

    def query_block(args):
        state, qg, q_positions, q_segments = args

        def step(carry, key_block):
            # Tied to the keys, the mask counts as depending on what is differentiated: otherwise, under a scan
            # over layers, autodiff would precompute it (it needs only positions and segment ids) for every
            # tile in a loop of its own and store it whole, (queries x keys).
            kj, vj, pj, sj, qp, qs = jax.lax.optimization_barrier((*key_block, q_positions, q_segments))

            def update(carry):
                m, total, acc = carry
                keep = _mask(qp, pj, qs, sj)
                s = jnp.where(keep, jnp.einsum("bkgqd,bskd->bkgqs", qg, kj.astype(jnp.float32)), _LOWEST)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vj.astype(jnp.float32))
                return m_new, total * correction + p.sum(-1), acc

            return jax.lax.cond(_tile_seen(qp, pj, qs, sj), update, lambda c: c, carry), None

        return jax.lax.scan(step, state, keys)[0]

    return _query_unblocked(jax.lax.map(query_block, _query_blocks((state, qg, q_positions, q_segments),
                                                                    blocks[0])))


def gradients(qg, dout, out, lse, q_positions, q_segments, k, v, k_positions, k_segments, blocks: tuple[int, int]):
    """The gradients (dq grouped, unscaled; dk, dv (b, keys, kv_heads, d) in float32) that the keys k, v give,
    for dout = the output's gradient grouped, and `out`, `lse` from `finish` after all keys."""
    delta = jnp.sum(dout * out, axis=-1)  # (b, k, g, q): the softmax's row term
    keys = tuple(_blocks(a, blocks[1]) for a in (k, v, k_positions, k_segments))

    def query_block(dkv, args):
        qg, dout, delta, lse, q_positions, q_segments = args

        def step(dq, key_block):
            kj, vj, pj, sj = key_block
            kj, vj = kj.astype(jnp.float32), vj.astype(jnp.float32)

            def update(dq):
                keep = _mask(q_positions, pj, q_segments, sj)
                s = jnp.einsum("bkgqd,bskd->bkgqs", qg, kj)
                p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
                dv = jnp.einsum("bkgqs,bkgqd->bskd", p, dout)
                ds = p * (jnp.einsum("bkgqd,bskd->bkgqs", dout, vj) - delta[..., None])
                dk = jnp.einsum("bkgqs,bkgqd->bskd", ds, qg)  # qg holds the scale the scores had
                return dq + jnp.einsum("bkgqs,bskd->bkgqd", ds, kj), (dk, dv)

            def skip(dq):
                return dq, (jnp.zeros_like(kj), jnp.zeros_like(vj))

            return jax.lax.cond(_tile_seen(q_positions, pj, q_segments, sj), update, skip, dq)

        dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg), keys)
        return (dkv[0] + _unblocked(dk), dkv[1] + _unblocked(dv)), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(query_block, zeros,
                                _query_blocks((qg, dout, delta, lse, q_positions, q_segments), blocks[0]))
    return _query_unblocked(dq), dk, dv


def tiles_computed(q_positions, k_positions, q_segments, k_segments, blocks: tuple[int, int]) -> jax.Array:
    """How many (query block x key block) tiles `attend` and `gradients` compute rather than skip, by the same
    test they make. Arguments as `blockwise_attention`'s, positions and segment ids (batch, length)."""
    qp, qs = (_blocks(a, blocks[0]) for a in (q_positions, q_segments))
    kp, ks = (_blocks(a, blocks[1]) for a in (k_positions, k_segments))
    seen = jax.vmap(lambda p, s: jax.vmap(lambda pj, sj: _tile_seen(p, pj, s, sj))(kp, ks))(qp, qs)
    return jnp.sum(seen)


# ----------------------------------------------------------------------------------------------------------


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(b, t, ...) -> (t / block, b, block, ...): the scan runs over the first dimension."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _unblocked(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _query_blocks(tree, block: int):
    """Grouped arrays (b, k, g, q, ...) and rows (b, q) -> their query blocks first: (q / block, ..., block, ...)."""
    def split(x):
        axis = 1 if x.ndim == 2 else 3
        x = x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)
    return jax.tree.map(split, tree)


def _query_unblocked(tree):
    def join(x):
        axis = 1 if x.ndim == 3 else 3
        x = jnp.moveaxis(x, 0, axis)
        return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])
    return jax.tree.map(join, tree)


def _mask(q_positions, k_positions, q_segments, k_segments) -> jax.Array:
    """(b, 1, 1, queries, block): True where the query may see the key."""
    keep = (k_positions[:, None, :] <= q_positions[:, :, None]) & (k_segments[:, None, :] == q_segments[:, :, None])
    return keep[:, None, None]


def _tile_seen(q_positions, k_positions, q_segments, k_segments) -> jax.Array:
    """False when no query of the batch may see any key of the tile: every key is after every query, or the
    documents of queries and keys do not overlap (segment ids ranges, which is conservative)."""
    after = jnp.min(k_positions, axis=1) > jnp.max(q_positions, axis=1)
    apart = (jnp.min(k_segments, axis=1) > jnp.max(q_segments, axis=1)) | \
            (jnp.max(k_segments, axis=1) < jnp.min(q_segments, axis=1))
    return jnp.any(~(after | apart))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_positions, k_positions, q_segments, k_segments, blocks):
    return _attention_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, blocks)[0]


def _attention_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, blocks):
    qg = grouped(q, k.shape[2], q.shape[3] ** -0.5)
    y, out, lse = finish(attend(start(qg), qg, q_positions, q_segments, k, v, k_positions, k_segments, blocks),
                         q.dtype)
    return y, (q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse)


def _attention_backward(blocks, residuals, dy):
    q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse = residuals
    kv_heads, scale = k.shape[2], q.shape[3] ** -0.5
    dq, dk, dv = gradients(grouped(q, kv_heads, scale), grouped(dy, kv_heads), out, lse, q_positions, q_segments,
                           k, v, k_positions, k_segments, blocks)
    return ungrouped(dq * scale, q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attention.defvjp(_attention_forward, _attention_backward)
