"""cuDNN flash attention over packed documents: cuDNN's ragged ("THD") layout, fed from segment ids.

cuDNN takes each row's documents as (offset, length) pairs, up to a fixed number per row, and runs causal
attention inside each, so nothing of size length x length is ever formed. The number of documents per row must
be static; a row with more than `max_documents(length)` would be cut short, so such a batch takes the Triton
kernel instead (`lax.cond`: one compiled step holds both, and only the batch that needs it runs the fallback).
cuDNN keeps a float32 softmax statistic of (batch x documents, heads, length) per layer for the backward, which
is why the cap is small and fixed rather than one document per token.

jax.nn.dot_product_attention does not expose the packed layout, so this calls the cuDNN binding it wraps.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxscale.kernels import flash_gpu

TOKENS_PER_DOCUMENT = 128
MAX_DOCUMENTS = 32


def max_documents(length: int) -> int:
    """How many documents a row may hold for the cuDNN kernel (more take the Triton kernel): one per 128 tokens,
    at most 32, so that cuDNN's saved statistics grow linearly with the length."""
    return max(1, min(MAX_DOCUMENTS, length // TOKENS_PER_DOCUMENT))


def document_bounds(segment_ids: jax.Array, documents: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(offsets (batch, documents + 1), lengths (batch, documents), count (batch,)) of each row's documents,
    in cuDNN's form: unused entries are -1. Each document is one contiguous run of equal segment ids."""
    batch, length = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    count = starts.sum(axis=1)
    first = jax.vmap(lambda row: jnp.nonzero(row, size=documents + 1, fill_value=length)[0])(starts)
    used = jnp.arange(documents + 1)[None, :] < count[:, None]
    lengths = jnp.where(used[:, :-1], first[:, 1:] - first[:, :-1], -1)
    offsets = jnp.where(used, first, -1)
    return offsets.astype(jnp.int32), lengths.astype(jnp.int32), count


def _cudnn(q, k, v, offsets, lengths, *, causal, sliding_window, scale):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    mask = MaskType.PADDING_CAUSAL if causal else MaskType.PADDING
    return dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
                                 mask_type=mask, sliding_window_length=sliding_window)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     causal: bool = True, sliding_window: int | None = None, scale: float | None = None
                     ) -> jax.Array:
    """q (batch, length, heads, head_dim), k and v (batch, length, kv_heads, head_dim), segment_ids (batch,
    length) -> (batch, length, heads, head_dim), on one device's arrays. Rows of more than
    `max_documents(length)` documents send the batch through the Triton kernel."""
    if sliding_window is not None and not causal:
        raise ValueError("cuDNN takes a sliding window only with causal attention")
    _, length, _, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    documents = max_documents(length)
    offsets, lengths, count = document_bounds(segment_ids, documents)
    options = dict(causal=causal, sliding_window=sliding_window, scale=scale)

    def cudnn(q, k, v, segment_ids):
        return _cudnn(q, k, v, offsets, lengths, **options)

    def triton(q, k, v, segment_ids):
        return flash_gpu.flash_attention(q, k, v, segment_ids, **options)

    return jax.lax.cond(jnp.any(count > documents), triton, cudnn, q, k, v, segment_ids)
