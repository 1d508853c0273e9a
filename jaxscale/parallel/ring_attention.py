"""Ring attention: context parallelism's attention with the keys passed round the ranks instead of gathered.

Called per device inside a shard_map over the context axes. Each of the C ranks keeps its queries (its two
balanced chunks) and its span of keys, values, positions and segment ids; in C steps it attends its queries to
the span it holds (`blockwise_attention.attend`, the online softmax carried from step to step) while handing
that span to the next rank with `jax.lax.ppermute`, so at step s it holds the span of rank r - s. The send
does not wait for the step's compute, so the two may overlap. Only C - 1 hand-overs are needed.

The backward is written out (custom_vjp) rather than left to autodiff: differentiated through the loop,
autodiff would save the span of every step, C spans, as much as the all-gather holds, and with them what every
tile of the online softmax computed (3077 MiB of temporaries against 41 MiB for 8k tokens over 8 ranks, 8
heads, in tests/test_context.py's memory case). Here the forward saves only the rank's own queries, keys,
values, output and log-sum-exp; the backward sends the keys and values round the ring again, and with each
span the gradients of its keys and values summed so far (float32), each rank adding what its queries
contribute (`blockwise_attention.gradients`). After C steps one more hand-over brings every span's gradients
home: the gradients travel C hops, the keys C - 1 in each pass.

Per rank and step the causal work is the same on every rank with balanced chunks (rank r holds chunks r and
2C - 1 - r): from any other rank's span it needs two whole (chunk x chunk) blocks of pairs, both its query
chunks against the span's early chunk (a span from before it) or its late chunk against both of the span's
(from after it), so no rank waits for another at the hand-overs (`context.tiles_per_rank`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxscale.parallel.blockwise_attention import attend, finish, gradients, grouped, start, ungrouped


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segments: jax.Array,
                   axes: tuple[str, ...], ranks: int, blocks: tuple[int, int]) -> jax.Array:
    """This rank's queries q (batch, length / C, heads, head_dim) attended causally to the whole sequence,
    whose keys and values k, v (batch, length / C, kv_heads, head_dim) are split over the mesh `axes` (`ranks`
    of them in all) like q. positions, segments: (batch, length / C), the rank's tokens' positions in the
    original sequence and documents. `blocks`: (queries, keys) per tile."""
    return _ring(q, k, v, positions, segments, axes, ranks, blocks)


def _pass(x, axes, ranks):
    """x from every rank to the next one round the ring."""
    return jax.lax.ppermute(x, axes, perm=[(r, (r + 1) % ranks) for r in range(ranks)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, positions, segments, axes, ranks, blocks):
    return _ring_forward(q, k, v, positions, segments, axes, ranks, blocks)[0]


def _ring_forward(q, k, v, positions, segments, axes, ranks, blocks):
    qg = grouped(q, k.shape[2], q.shape[3] ** -0.5)

    def take(state, span):
        return attend(state, qg, positions, segments, *span, blocks)

    def step(carry, _):
        state, span = carry
        return (take(state, span), _pass(span, axes, ranks)), None

    (state, span), _ = jax.lax.scan(step, (start(qg), (k, v, positions, segments)), length=ranks - 1)
    y, out, lse = finish(take(state, span), q.dtype)
    return y, (q, k, v, positions, segments, out, lse)


def _ring_backward(axes, ranks, blocks, residuals, dy):
    q, k, v, positions, segments, out, lse = residuals
    kv_heads, scale = k.shape[2], q.shape[3] ** -0.5
    qg, dout = grouped(q, kv_heads, scale), grouped(dy, kv_heads)

    def take(dq, span, dkv):
        dq_span, dk, dv = gradients(qg, dout, out, lse, positions, segments, *span, blocks)
        return dq + dq_span, (dkv[0] + dk, dkv[1] + dv)

    def step(carry, _):
        dq, span, dkv = carry
        dq, dkv = take(dq, span, dkv)
        return (dq, _pass(span, axes, ranks), _pass(dkv, axes, ranks)), None

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dq, span, dkv), _ = jax.lax.scan(step, (jnp.zeros_like(qg), (k, v, positions, segments), zeros),
                                      length=ranks - 1)
    dq, dkv = take(dq, span, dkv)
    dk, dv = _pass(dkv, axes, ranks)  # each span's gradients back to the rank that holds the span
    return ungrouped(dq * scale, q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_forward, _ring_backward)
