"""LayerNorm (GPT-2) and RMSNorm (Llama), and on GPUs a backward pass written as one Pallas kernel.

XLA differentiates the norm into a row-wise fusion for the input gradient and separate column sums (over every
token) for the scale and bias gradients; at gpt2-124m's shape (32 x 1024 rows of 768) forward and backward take
0.23 ms on an H100, about five times the memory bound. The kernel here reads each row of x and of the incoming
gradient once, writes the input gradient, and keeps each program's column sums; XLA adds those few partial sums
up. It measured 0.13 ms there and 4% off the whole gpt2-124m step; retiled (1024 programs, 2 rows at a time
for wider rows) it also beats XLA at d = 1024, 3% off the gpt2-350m step (BENCHMARKS.md). It is used where it
was measured faster, rows of at most 1024, on each GPU's own rows when the mesh splits the batch (data, FSDP;
tensor-parallel ranks repeat the same rows), not under pipeline stages.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxscale.sharding import RowKernelLayout, row_kernel_layout

FUSED_BACKWARD_MAX_WIDTH = 1024  # retiled, faster than XLA at 768 and 1024 (H200)
ACTIVATION = ("batch", "length", "embed")  # the logical names of what is normalized


def normalize(x, scale, bias, eps):
    """y, and the per-row mean (None for RMSNorm) and 1/std the backward pass needs; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True) if bias is not None else None
    centred = x32 - mean if mean is not None else x32
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    y = centred * rstd * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), mean, rstd


def norm(x, scale, bias, eps):
    """LayerNorm (with bias, GPT-2) or RMSNorm (bias None, Llama) over the last axis of an activation
    (batch, length, embed)."""
    layout = row_kernel_layout(ACTIVATION) if x.shape[-1] <= FUSED_BACKWARD_MAX_WIDTH else None
    if layout is not None:
        return norm_with_fused_backward(x, scale, bias, eps, layout)
    return normalize(x, scale, bias, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm_with_fused_backward(x, scale, bias, eps, layout: RowKernelLayout):
    return _forward(x, scale, bias, eps, layout)[0]


def _forward(x, scale, bias, eps, layout):
    y, mean, rstd = normalize(x, scale, bias, eps)
    return y, (x, scale, bias, mean, rstd)


def _backward(eps, layout, saved, dy):
    x, scale, bias, mean, rstd = saved
    if mean is None:
        mean = jnp.zeros_like(rstd)
    centred = bias is not None
    kernel = functools.partial(norm_backward, centred=centred)
    rows, sums = layout.spec, layout.per_device  # mean and rstd keep a last dimension of 1, laid out like x
    dx, dscale, dbias = layout.apply(kernel, in_specs=(rows, rows, PartitionSpec(), rows, rows),
                                     out_specs=(rows, sums, sums))(x, dy, scale, mean, rstd)
    return dx, dscale.sum(0).astype(scale.dtype), dbias.sum(0).astype(bias.dtype) if centred else None


norm_with_fused_backward.defvjp(_forward, _backward)


def norm_backward(x, dy, scale, mean, rstd, *, centred: bool, interpret: bool = False,
                  rows_per_block: int | None = None, programs: int = 1024, num_warps: int = 4):
    """dx, and dscale and dbias as partial sums, one row per program (their sums over the first axis are the
    gradients; dbias is meaningful only if centred), of y = (x - mean) * rstd * scale (+ bias) over the last axis.

    mean and rstd: one float32 number per row (any shape that flattens to the rows). Each of ~`programs`
    programs walks its rows `rows_per_block` at a time (by default 8 rows up to width 768, else 2: the fastest
    tilings measured on an H200). interpret=True runs the kernel on any backend (tests)."""
    from jax.experimental import pallas as pl  # imported here: only the GPU path and its tests need Pallas
    from jax.experimental.pallas import triton as plgpu

    width = x.shape[-1]
    rows_per_block = rows_per_block or (8 if width <= 768 else 2)
    rows = x.reshape(-1, width)
    n_rows = rows.shape[0]
    steps = max(1, min(32, n_rows // (rows_per_block * programs)))  # row blocks per program
    grid = pl.cdiv(n_rows, rows_per_block * steps)
    padded_width = pl.next_power_of_2(width)  # Triton blocks are powers of two; the excess columns are masked

    def kernel(x_ref, dy_ref, scale_ref, mean_ref, rstd_ref, dx_ref, dscale_ref, dbias_ref):
        cols = jnp.arange(padded_width)
        col_ok = cols < width
        g_scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
        first = pl.program_id(0) * rows_per_block * steps

        def block(step, sums):
            row = first + step * rows_per_block + jnp.arange(rows_per_block)
            row_ok = row < n_rows
            ok = row_ok[:, None] & col_ok[None, :]
            at = (row[:, None], cols[None, :])
            xs = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
            dys = plgpu.load(dy_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
            row_rstd = plgpu.load(rstd_ref.at[row], mask=row_ok, other=0.0)[:, None]
            row_mean = plgpu.load(mean_ref.at[row], mask=row_ok, other=0.0)[:, None]
            xhat = jnp.where(ok, (xs - row_mean) * row_rstd, 0.0)
            g = dys * g_scale[None, :]
            dx = g - xhat * (jnp.sum(g * xhat, axis=1, keepdims=True) / width)
            if centred:
                dx = dx - jnp.sum(g, axis=1, keepdims=True) / width
            plgpu.store(dx_ref.at[at], (dx * row_rstd).astype(dx_ref.dtype), mask=ok)
            dscale, dbias = sums
            return dscale + jnp.sum(dys * xhat, axis=0), dbias + jnp.sum(dys, axis=0)

        zeros = jnp.zeros((padded_width,), jnp.float32)
        dscale, dbias = jax.lax.fori_loop(0, steps, block, (zeros, zeros))
        program = pl.program_id(0)
        plgpu.store(dscale_ref.at[program, cols], dscale, mask=col_ok)
        plgpu.store(dbias_ref.at[program, cols], dbias, mask=col_ok)

    dx, dscale, dbias = pl.pallas_call(
        kernel, grid=(grid,), name="norm_backward", interpret=interpret,
        out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype),
                   jax.ShapeDtypeStruct((grid, width), jnp.float32),  # per-program column sums
                   jax.ShapeDtypeStruct((grid, width), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
    )(rows, dy.reshape(-1, width), scale, mean.reshape(-1), rstd.reshape(-1))
    return dx.reshape(x.shape), dscale, dbias
