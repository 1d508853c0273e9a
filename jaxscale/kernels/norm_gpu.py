"""The norm's backward pass as one Pallas kernel on Triton (GPUs); `jaxscale.kernels.norm` decides where it runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def norm_backward(x, dy, scale, mean, rstd, *, centred: bool, interpret: bool = False,
                  rows_per_block: int | None = None, programs: int = 1024, num_warps: int = 4):
    """dx, and dscale and dbias as partial sums, one row per program (their sums over the first axis are the
    gradients; dbias is meaningful only if centred), of y = (x - mean) * rstd * scale (+ bias) over the last axis.

    mean and rstd: one float32 number per row (any shape that flattens to the rows). Each of ~`programs`
    programs walks its rows `rows_per_block` at a time (by default 8 rows up to width 768, else 2: the fastest
    tilings measured). interpret=True runs the kernel on any backend (tests)."""
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
