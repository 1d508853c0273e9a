"""Causal flash attention over packed documents as Pallas (Triton) kernels for GPUs: forward, dK/dV and dQ.

Each document is one contiguous run of equal segment ids in its row (as `jaxscale.data.packing` makes them), so
query i sees exactly the keys [lo[i], hi[i]): from the start of its document (or its sliding window) up to
itself. Both bounds grow with i, which is all the kernels need: a block of queries visits only the key blocks
between its first query's lo and its last query's hi, and masks only the blocks where some query's range ends
inside (the diagonal and document starts); blocks every query sees whole are computed unmasked. Nothing of size
length x length is ever written. The backward pass walks keys the same way, with each key's range of queries.

Grouped-query attention is native: query head h reads KV head h // (heads / kv_heads), and the dK/dV program
of a KV head sums over its query heads, so K and V are never repeated in memory. The softmax runs in base 2
with float32 statistics; the forward keeps the output and the per-row log-sum-exp for the backward.
`interpret=True` runs the same kernels through Pallas's interpreter on any backend (tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxscale.remat import ATTENTION_RESIDUALS

LOG2_E = math.log2(math.e)
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a row masked in a whole block must not make NaNs


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes (queries x keys) of the three kernels, and their Triton warps and pipeline stages."""
    forward: tuple[int, int] = (128, 64)
    dkv: tuple[int, int] = (64, 128)
    dq: tuple[int, int] = (128, 64)
    warps: int = 4
    stages: int = 3
    backward_warps: int = 8
    backward_stages: int = 2

    def fitted(self, length: int) -> Tiles:
        """The tiles shrunk (halved) until each divides `length`."""
        def fit(block):
            return tuple(_fit(b, length) for b in block)
        return dataclasses.replace(self, forward=fit(self.forward), dkv=fit(self.dkv), dq=fit(self.dq))


# Tiles measured fastest per head size (`experiments/attention_kernels.py --sweep`); others take Tiles().
TILES_BY_HEAD_DIM: dict[int, Tiles] = {
    128: Tiles(forward=(64, 64), dkv=(64, 128), dq=(128, 64), warps=4, stages=3, backward_warps=8,
               backward_stages=3),  # H200, Llama 3.2 3B attention shape (BENCHMARKS.md)
}


def tiles_for(head_dim: int) -> Tiles:
    return TILES_BY_HEAD_DIM.get(head_dim, Tiles())


def _fit(block: int, length: int) -> int:
    while length % block:
        block //= 2
    return block


MIN_BLOCK = 16  # Triton's matmuls need at least 16 rows and columns


def supports(length: int, head_dim: int, tiles: Tiles | None = None) -> str | None:
    """Why these kernels cannot take a sequence length and head size, or None when they can."""
    if head_dim < MIN_BLOCK or head_dim & (head_dim - 1) or head_dim > 256:
        return f"head size {head_dim} is not a power of two between {MIN_BLOCK} and 256"
    fitted = (tiles or tiles_for(head_dim)).fitted(length)
    if min(*fitted.forward, *fitted.dkv, *fitted.dq) < MIN_BLOCK:
        return f"length {length} is not a multiple of {MIN_BLOCK}"
    return None


def token_bounds(segment_ids: jax.Array | None, batch: int, length: int, *, causal: bool,
                 sliding_window: int | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per token, int32 (batch, length): query i sees keys [key_lo[i], key_hi[i]), key j is seen by queries
    [query_lo[j], query_hi[j]). Each is non-decreasing along the row."""
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        start, end = jnp.zeros_like(index), jnp.full_like(index, length)
    else:
        change = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        start = jax.lax.cummax(jnp.where(change, index, 0), axis=1)
        last = jnp.concatenate([change[:, 1:], jnp.ones((batch, 1), bool)], axis=1)  # a run's last token
        end = jax.lax.cummin(jnp.where(last, index + 1, length), axis=1, reverse=True)
    key_lo, key_hi = start, (index + 1 if causal else end)
    query_lo, query_hi = (index if causal else start), end
    if sliding_window is not None:
        key_lo = jnp.maximum(key_lo, index - sliding_window + 1)
        query_hi = jnp.minimum(query_hi, index + sliding_window)
        if not causal:
            key_hi = jnp.minimum(key_hi, index + sliding_window)
            query_lo = jnp.maximum(query_lo, index - sliding_window + 1)
    return key_lo, key_hi, query_lo, query_hi


def _block_ranges(lo, hi, block: int):
    """lo, hi: the bounds of one block's rows (vectors). The blocks of the other axis that some row needs
    [first, end), and among them those every row needs whole [full_first, full_end), which need no mask."""
    first = jax.lax.div(jnp.min(lo), block)
    end = jax.lax.div(jnp.max(hi) + block - 1, block)
    full_first = jnp.maximum(jax.lax.div(jnp.max(lo) + block - 1, block), first)
    full_end = jnp.minimum(jax.lax.div(jnp.min(hi), block), end)
    empty = full_end <= full_first
    return first, jnp.where(empty, end, full_first), jnp.where(empty, end, full_end), end


def _three_loops(ranges, body, carry):
    """body(block, carry, masked) over the masked blocks before the whole ones, the whole ones, and the
    masked ones after."""
    first, full_first, full_end, end = ranges
    carry = jax.lax.fori_loop(first, full_first, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(full_first, full_end, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full_end, end, functools.partial(body, masked=True), carry)


def _forward_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref, *, scale, groups, block_q, block_k):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    start, b, h = pl.program_id(0) * block_q, pl.program_id(1), pl.program_id(2)
    kv_head = jax.lax.div(h, groups)
    rows = pl.ds(start, block_q)
    q = plgpu.load(q_ref.at[b, rows, h, :])
    lo, hi = plgpu.load(lo_ref.at[b, rows]), plgpu.load(hi_ref.at[b, rows])

    def body(block, carry, masked):
        acc, row_max, row_sum = carry
        cols = pl.ds(block * block_k, block_k)
        k = plgpu.load(k_ref.at[b, cols, kv_head, :])
        v = plgpu.load(v_ref.at[b, cols, kv_head, :])
        s = plgpu.dot(q, k.T) * (scale * LOG2_E)
        if masked:
            key = block * block_k + jnp.arange(block_k)
            s = jnp.where((key[None, :] >= lo[:, None]) & (key[None, :] < hi[:, None]), s, MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.exp2(s - new_max[:, None])
        correction = jnp.exp2(row_max - new_max)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, new_max, row_sum * correction + jnp.sum(p, axis=1)

    head_dim = q.shape[-1]
    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = _three_loops(_block_ranges(lo, hi, block_k), body, carry)
    plgpu.store(o_ref.at[b, rows, h, :], (acc / row_sum[:, None]).astype(o_ref.dtype))
    plgpu.store(lse_ref.at[b, h, rows], row_max + jnp.log2(row_sum))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dk_ref, dv_ref, *, scale,
                groups, block_q, block_k):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    start, b, kv_head = pl.program_id(0) * block_k, pl.program_id(1), pl.program_id(2)
    cols = pl.ds(start, block_k)
    k = plgpu.load(k_ref.at[b, cols, kv_head, :])
    v = plgpu.load(v_ref.at[b, cols, kv_head, :])
    lo, hi = plgpu.load(lo_ref.at[b, cols]), plgpu.load(hi_ref.at[b, cols])  # the queries each key is seen by
    ranges = _block_ranges(lo, hi, block_q)

    def one_head(g, carry):
        h = kv_head * groups + g

        def body(block, carry, masked):  # keys as rows: no transposes of computed tiles
            dk, dv = carry
            rows = pl.ds(block * block_q, block_q)
            q = plgpu.load(q_ref.at[b, rows, h, :])
            do = plgpu.load(do_ref.at[b, rows, h, :])
            lse = plgpu.load(lse_ref.at[b, h, rows])
            delta = plgpu.load(delta_ref.at[b, h, rows])
            p_t = jnp.exp2(plgpu.dot(k, q.T) * (scale * LOG2_E) - lse[None, :])  # (keys, queries)
            if masked:
                query = block * block_q + jnp.arange(block_q)
                p_t = jnp.where((query[None, :] >= lo[:, None]) & (query[None, :] < hi[:, None]), p_t, 0.0)
            dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
            ds_t = p_t * (plgpu.dot(v, do.T) - delta[None, :])
            return dk + plgpu.dot(ds_t.astype(q.dtype), q), dv

        return _three_loops(ranges, body, carry)

    zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, one_head, (zeros, zeros))
    plgpu.store(dk_ref.at[b, cols, kv_head, :], (dk * scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref.at[b, cols, kv_head, :], dv.astype(dv_ref.dtype))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dq_ref, *, scale, groups,
               block_q, block_k):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    start, b, h = pl.program_id(0) * block_q, pl.program_id(1), pl.program_id(2)
    kv_head = jax.lax.div(h, groups)
    rows = pl.ds(start, block_q)
    q = plgpu.load(q_ref.at[b, rows, h, :])
    do = plgpu.load(do_ref.at[b, rows, h, :])
    lse = plgpu.load(lse_ref.at[b, h, rows])
    delta = plgpu.load(delta_ref.at[b, h, rows])
    lo, hi = plgpu.load(lo_ref.at[b, rows]), plgpu.load(hi_ref.at[b, rows])

    def body(block, dq, masked):
        cols = pl.ds(block * block_k, block_k)
        k = plgpu.load(k_ref.at[b, cols, kv_head, :])
        v = plgpu.load(v_ref.at[b, cols, kv_head, :])
        p = jnp.exp2(plgpu.dot(q, k.T) * (scale * LOG2_E) - lse[:, None])
        if masked:
            key = block * block_k + jnp.arange(block_k)
            p = jnp.where((key[None, :] >= lo[:, None]) & (key[None, :] < hi[:, None]), p, 0.0)
        ds = p * (plgpu.dot(do, v.T) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = _three_loops(_block_ranges(lo, hi, block_k), body, jnp.zeros(q.shape, jnp.float32))
    plgpu.store(dq_ref.at[b, rows, h, :], (dq * scale).astype(dq_ref.dtype))


def _call(kernel, name, grid, out_shape, tiles: Tiles, backward: bool, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams(num_warps=tiles.backward_warps if backward else tiles.warps,
                                  num_stages=tiles.backward_stages if backward else tiles.stages)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, name=name, interpret=interpret,
                          compiler_params=params)


def _forward(q, k, v, key_lo, key_hi, scale, tiles, interpret):
    batch, length, heads, _ = q.shape
    block_q, block_k = tiles.forward
    kernel = functools.partial(_forward_kernel, scale=scale, groups=heads // k.shape[2], block_q=block_q,
                               block_k=block_k)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)]
    return _call(kernel, "flash_attention_forward", (length // block_q, batch, heads), out_shape, tiles,
                 backward=False, interpret=interpret)(q, k, v, key_lo, key_hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, key_lo, key_hi, query_lo, query_hi, scale, tiles, interpret):
    return _forward(q, k, v, key_lo, key_hi, scale, tiles, interpret)[0]


def _flash_forward(q, k, v, key_lo, key_hi, query_lo, query_hi, scale, tiles, interpret):
    out, lse = _forward(q, k, v, key_lo, key_hi, scale, tiles, interpret)
    # named, so that remat policies can keep them rather than run the forward kernel again (jaxscale.remat)
    out, lse = checkpoint_name(out, ATTENTION_RESIDUALS), checkpoint_name(lse, ATTENTION_RESIDUALS)
    return out, (q, k, v, key_lo, key_hi, query_lo, query_hi, out, lse)


def _flash_backward(scale, tiles, interpret, residuals, d_out):
    q, k, v, key_lo, key_hi, query_lo, query_hi, out, lse = residuals
    batch, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    # rowsum(dO * O), the softmax gradient's correction term, in the log-sum-exp's layout
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    common = dict(scale=scale, groups=heads // kv_heads)
    block_q, block_k = tiles.dkv
    dk, dv = _call(functools.partial(_dkv_kernel, **common, block_q=block_q, block_k=block_k),
                   "flash_attention_dkv", (length // block_k, batch, kv_heads),
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], tiles,
                   backward=True, interpret=interpret)(q, k, v, d_out, lse, delta, query_lo, query_hi)
    block_q, block_k = tiles.dq
    dq = _call(functools.partial(_dq_kernel, **common, block_q=block_q, block_k=block_k),
               "flash_attention_dq", (length // block_q, batch, heads), jax.ShapeDtypeStruct(q.shape, q.dtype),
               tiles, backward=True, interpret=interpret)(q, k, v, d_out, lse, delta, key_lo, key_hi)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                    causal: bool = True, sliding_window: int | None = None, scale: float | None = None,
                    tiles: Tiles | None = None, interpret: bool = False) -> jax.Array:
    """q (batch, length, heads, head_dim), k and v (batch, length, kv_heads, head_dim), segment_ids (batch,
    length) int or None (one document per row) -> (batch, length, heads, head_dim). `supports` says which
    lengths and head sizes it takes; tiles: `tiles_for(head_dim)` unless given."""
    batch, length, _, head_dim = q.shape
    tiles = tiles or tiles_for(head_dim)
    reason = supports(length, head_dim, tiles)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    bounds = token_bounds(segment_ids, batch, length, causal=causal, sliding_window=sliding_window)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return _flash(q, k, v, *bounds, scale, tiles.fitted(length), interpret)
