"""Attention over packed documents on TPUs: JAX's Splash attention (a Pallas Mosaic kernel) with segment ids.

Splash skips the blocks its static mask (causal, or a causal sliding window) leaves empty and masks across
documents by segment id inside the rest. It takes one sequence with heads first, so the batch is a vmap and
q, k, v are transposed to (heads, length, head_dim); grouped-query attention is native (kv_heads dividing
heads). Runs on TPUs; `interpret=True` runs it through Pallas's interpreter on any backend (tests).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxscale.remat import ATTENTION_RESIDUALS

BLOCKS = (512, 256, 128)  # the largest that divides the length is used


def block_size(length: int) -> int | None:
    return next((b for b in BLOCKS if length % b == 0), None)


def supports(length: int, head_dim: int) -> str | None:
    """Why Splash cannot take a sequence length, or None when it can."""
    if block_size(length) is None:
        return f"length {length} is not a multiple of {BLOCKS[-1]}"
    return None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     causal: bool = True, sliding_window: int | None = None, scale: float | None = None,
                     interpret: bool = False) -> jax.Array:
    """q (batch, length, heads, head_dim), k and v (batch, length, kv_heads, head_dim), segment_ids (batch,
    length) int or None -> (batch, length, heads, head_dim)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q.shape
    reason = supports(length, head_dim)
    if reason is not None:
        raise ValueError(f"splash_attention: {reason}")
    shape = (length, length)
    if sliding_window is not None:
        one_head = splash.LocalMask(shape, (sliding_window - 1, 0 if causal else sliding_window - 1), offset=0)
    elif causal:
        one_head = splash.CausalMask(shape)
    else:
        one_head = splash.FullMask(shape)
    block = block_size(length)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                               block_kv_dq=block)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([one_head] * heads), head_shards=1, q_seq_shards=1,
                                    block_sizes=blocks, residual_checkpoint_name=ATTENTION_RESIDUALS,
                                    interpret=interpret)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    heads_first = (0, 2, 1, 3)
    q, k, v = ((q * scale).astype(q.dtype).transpose(heads_first), k.transpose(heads_first),
               v.transpose(heads_first))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        segment_ids = segment_ids.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v,
                                                                                               segment_ids)
    return out.transpose(heads_first)
