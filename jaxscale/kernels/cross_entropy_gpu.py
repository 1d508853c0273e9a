"""Next-token cross-entropy and its gradient as one Pallas kernel on Triton (GPUs);
`jaxscale.kernels.cross_entropy` decides where it runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_kernel(logits, targets, *, gradient: bool, mean_over: int | None = None, interpret: bool = False,
                   rows_per_block: int = 1, block_width: int = 2048, num_warps: int = 4):
    """Per position -log softmax(logits)[target] (float32, shaped like targets) and, if `gradient`, the gradient
    of their mean over `mean_over` positions (default: these), (softmax - one-hot) / mean_over, in the logits'
    dtype (else None).

    Each program takes `rows_per_block` rows and walks the vocabulary `block_width` columns at a time.
    interpret=True runs the kernel on any backend (tests)."""
    from jax.experimental import pallas as pl  # imported here: only the GPU path and its tests need Pallas
    from jax.experimental.pallas import triton as plgpu

    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n_rows = rows.shape[0]
    blocks = pl.cdiv(vocab, block_width)
    scale = 1.0 / (mean_over or n_rows)
    lowest = -1e30  # stands in for -inf in masked lanes: exp(lowest - max) is 0, and no inf - inf NaNs

    def kernel(logits_ref, targets_ref, losses_ref, *gradient_ref):
        row = pl.program_id(0) * rows_per_block + jnp.arange(rows_per_block)
        row_ok = row < n_rows
        target = plgpu.load(targets_ref.at[row], mask=row_ok, other=0)

        def columns(block):
            cols = block * block_width + jnp.arange(block_width)
            ok = row_ok[:, None] & (cols < vocab)[None, :]
            return cols, ok, (row[:, None], cols[None, :])

        def normalizer(block, carry):  # online softmax: running max and sum of exponentials per row
            top, total = carry
            _, ok, at = columns(block)
            x = plgpu.load(logits_ref.at[at], mask=ok, other=lowest).astype(jnp.float32)
            new_top = jnp.maximum(top, jnp.max(x, axis=1))
            total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(x - new_top[:, None]), axis=1)
            return new_top, total

        start = (jnp.full((rows_per_block,), lowest, jnp.float32), jnp.zeros((rows_per_block,), jnp.float32))
        top, total = jax.lax.fori_loop(0, blocks, normalizer, start)
        log_normalizer = top + jnp.log(total)
        target_logit = plgpu.load(logits_ref.at[row, target], mask=row_ok, other=0.0).astype(jnp.float32)
        plgpu.store(losses_ref.at[row], log_normalizer - target_logit, mask=row_ok)
        if gradient:
            def write_gradient(block, _):
                cols, ok, at = columns(block)
                x = plgpu.load(logits_ref.at[at], mask=ok, other=lowest).astype(jnp.float32)
                probs = jnp.exp(x - log_normalizer[:, None])
                g = (probs - jnp.where(cols[None, :] == target[:, None], 1.0, 0.0)) * scale
                plgpu.store(gradient_ref[0].at[at], g.astype(gradient_ref[0].dtype), mask=ok)
                return 0

            jax.lax.fori_loop(0, blocks, write_gradient, 0)

    out_shape = [jax.ShapeDtypeStruct((n_rows,), jnp.float32)]
    if gradient:
        out_shape.append(jax.ShapeDtypeStruct(rows.shape, logits.dtype))
    out = pl.pallas_call(
        kernel, grid=(pl.cdiv(n_rows, rows_per_block),), out_shape=out_shape, interpret=interpret,
        name="cross_entropy", compiler_params=plgpu.CompilerParams(num_warps=num_warps),
    )(rows, targets.reshape(-1).astype(jnp.int32))
    losses = out[0].reshape(targets.shape)
    return losses, out[1].reshape(logits.shape) if gradient else None
