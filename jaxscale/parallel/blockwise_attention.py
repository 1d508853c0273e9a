"""Attention over key blocks with an online softmax, in plain JAX: no (queries x keys) mask or score matrix is
ever whole, only one (queries x block) piece at a time, so memory grows linearly with the key length.

The mask comes from each token's position in the original sequence (causal: a key at or before the query) and
its document (segment id), so the queries and keys may be in any order, as context parallelism's balanced
chunks put them. The forward keeps the output and the log-sum-exp of each query's scores; the backward walks
the key blocks again and recomputes each block's probabilities from them (flash attention's backward), so
nothing per block is stored between the passes. A block that no query of the batch may see (all its keys after
every query, or no document in common) is skipped in both passes.

Everything is computed in float32 and the output is cast back to the queries' dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 512  # keys per block; the largest divisor of the key length up to this is used
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
    i // (heads / kv_heads). `block`: keys per block at most."""
    if (q_segments is None) != (k_segments is None):
        raise ValueError("give segment ids for both the queries and the keys, or for neither")
    if q_segments is None:
        q_segments, k_segments = jnp.zeros_like(q_positions), jnp.zeros_like(k_positions)
    return _attention(q, k, v, q_positions, k_positions, q_segments, k_segments, key_block(k.shape[1], block))


def _grouped(x: jax.Array, kv_heads: int, scale: float = 1.0) -> jax.Array:
    """(b, t, heads, d) -> (b, kv_heads, groups, t, d) in float32, times `scale`."""
    b, t, h, d = x.shape
    x = x.astype(jnp.float32) * scale
    return x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(x: jax.Array, dtype) -> jax.Array:
    b, k, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d).astype(dtype)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(b, t, ...) -> (t / block, b, block, ...): the scan runs over the first dimension."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _unblocked(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _mask(q_positions, k_positions, q_segments, k_segments) -> jax.Array:
    """(b, 1, 1, queries, block): True where the query may see the key."""
    keep = (k_positions[:, None, :] <= q_positions[:, :, None]) & (k_segments[:, None, :] == q_segments[:, :, None])
    return keep[:, None, None]


def _block_seen(q_positions, k_positions, q_segments, k_segments) -> jax.Array:
    """False when no query of the batch may see any key of the block: every key is after every query, or the
    documents of queries and keys do not overlap (segment ids ranges, which is conservative)."""
    after = jnp.min(k_positions, axis=1) > jnp.max(q_positions, axis=1)
    apart = (jnp.min(k_segments, axis=1) > jnp.max(q_segments, axis=1)) | \
            (jnp.max(k_segments, axis=1) < jnp.min(q_segments, axis=1))
    return jnp.any(~(after | apart))


def _forward(q, k, v, q_positions, k_positions, q_segments, k_segments, block):
    b, tq, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = _grouped(q, kv_heads, d ** -0.5)
    shape = (b, kv_heads, heads // kv_heads, tq)
    init = (jnp.full(shape, _LOWEST), jnp.zeros(shape), jnp.zeros((*shape, d)))

    def step(carry, kv_block):
        # Tied to the keys, the mask counts as depending on what is differentiated: otherwise, under a scan
        # over layers, autodiff would precompute it (it needs only positions and segment ids) for every block
        # in a loop of its own and store it whole, (queries x keys).
        kj, vj, pj, sj, qp, qs = jax.lax.optimization_barrier((*kv_block, q_positions, q_segments))

        def attend(carry):
            m, total, acc = carry
            keep = _mask(qp, pj, qs, sj)
            s = jnp.where(keep, jnp.einsum("bkgqd,bskd->bkgqs", qg, kj.astype(jnp.float32)), _LOWEST)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vj.astype(jnp.float32))
            return m_new, total * correction + p.sum(-1), acc

        seen = _block_seen(qp, pj, qs, sj)
        return jax.lax.cond(seen, attend, lambda c: c, carry), None

    blocks = tuple(_blocks(a, block) for a in (k, v, k_positions, k_segments))
    (m, total, acc), _ = jax.lax.scan(step, init, blocks)
    out = acc / total[..., None]  # every query sees itself, so total > 0
    return _ungrouped(out, q.dtype), (out, m + jnp.log(total))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_positions, k_positions, q_segments, k_segments, block):
    return _forward(q, k, v, q_positions, k_positions, q_segments, k_segments, block)[0]


def _attention_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, block):
    y, (out, lse) = _forward(q, k, v, q_positions, k_positions, q_segments, k_segments, block)
    return y, (q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse)


def _attention_backward(block, residuals, dy):
    q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse = residuals
    kv_heads, d = k.shape[2], q.shape[3]
    qg = _grouped(q, kv_heads, d ** -0.5)
    dout = _grouped(dy, kv_heads)
    delta = jnp.sum(dout * out, axis=-1)  # (b, k, g, q): the softmax's row term

    def step(dq, kv_block):
        kj, vj, pj, sj = kv_block
        kj, vj = kj.astype(jnp.float32), vj.astype(jnp.float32)

        def attend(dq):
            keep = _mask(q_positions, pj, q_segments, sj)
            s = jnp.einsum("bkgqd,bskd->bkgqs", qg, kj)
            p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
            dv = jnp.einsum("bkgqs,bkgqd->bskd", p, dout)
            ds = p * (jnp.einsum("bkgqd,bskd->bkgqs", dout, vj) - delta[..., None])
            dk = jnp.einsum("bkgqs,bkgqd->bskd", ds, qg)  # qg holds the scale the scores had
            return dq + jnp.einsum("bkgqs,bskd->bkgqd", ds, kj), (dk, dv)

        def skip(dq):
            return dq, (jnp.zeros_like(kj), jnp.zeros_like(vj))

        return jax.lax.cond(_block_seen(q_positions, pj, q_segments, sj), attend, skip, dq)

    blocks = tuple(_blocks(a, block) for a in (k, v, k_positions, k_segments))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg), blocks)
    dq = _ungrouped(dq * (d ** -0.5), q.dtype)
    return dq, _unblocked(dk).astype(k.dtype), _unblocked(dv).astype(v.dtype), None, None, None, None


_attention.defvjp(_attention_forward, _attention_backward)
