"""GPT-2's bias + GELU (tanh form) as two Pallas kernels on Triton (GPUs), forward and backward;
`jaxscale.kernels.gelu` decides where they run."""
from __future__ import annotations

import jax
import jax.numpy as jnp

SQRT_2_OVER_PI = 0.7978845608028654
CUBIC = 0.044715


def gelu_and_slope(x):
    """gelu(x) = x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3) (the tanh form), and its derivative."""
    s = 1.0 / (1.0 + jnp.exp(-2.0 * SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))
    slope = s + x * s * (1.0 - s) * (2.0 * SQRT_2_OVER_PI) * (1.0 + 3.0 * CUBIC * x * x)
    return x * s, slope


def gelu_forward(y, b, *, interpret: bool = False, tiling=None):
    """gelu(y + b) over the last axis's columns in float32 arithmetic, output in y's dtype. interpret=True runs
    the kernel on any backend (tests)."""
    from jax.experimental.pallas import triton as plgpu

    def block(refs, at, ok, bias, carry):
        _, y_ref, out_ref = refs
        x = plgpu.load(y_ref.at[at], mask=ok, other=0.0).astype(jnp.float32) + bias[None, :]
        plgpu.store(out_ref.at[at], gelu_and_slope(x)[0].astype(out_ref.dtype), mask=ok)
        return carry

    (out,) = _column_block_call(block, "gelu_forward", b, [y], column_sums=False, interpret=interpret,
                                tiling=tiling)
    return out.reshape(y.shape)


def gelu_backward(y, b, dg, *, interpret: bool = False, tiling=None):
    """dy = dg * gelu'(y + b), and db as partial column sums of dy in float32, one row per program (their sum
    over the first axis is the gradient)."""
    from jax.experimental.pallas import triton as plgpu

    def block(refs, at, ok, bias, sums):
        _, y_ref, dg_ref, dy_ref, _ = refs
        x = plgpu.load(y_ref.at[at], mask=ok, other=0.0).astype(jnp.float32) + bias[None, :]
        grad = plgpu.load(dg_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        dy = jnp.where(ok, grad * gelu_and_slope(x)[1], 0.0)
        plgpu.store(dy_ref.at[at], dy.astype(dy_ref.dtype), mask=ok)
        return sums + jnp.sum(dy, axis=0)

    dy, db = _column_block_call(block, "gelu_backward", b, [y, dg], column_sums=True, interpret=interpret,
                                tiling=tiling)
    return dy.reshape(y.shape), db


def _column_block_call(block, name, b, arrays, *, column_sums, interpret, tiling):
    """Runs `block(refs, at, ok, bias, sums)` (refs: b, the arrays, the outputs; `at` indexes a block of rows
    and columns, `ok` masks rows past the end) over arrays of one shape (..., width): a grid of row programs by
    column blocks, each program walking its rows `rows_per_block` at a time. Returns an array like the first,
    and with column_sums the float32 sums `block` returns, one row per row program.

    tiling: (rows_per_block, columns_per_block, row programs, warps); the default is the fastest tiling measured
    for forward plus backward at GPT-2's MLP shapes."""
    from jax.experimental import pallas as pl  # imported here: only the GPU path and its tests need Pallas
    from jax.experimental.pallas import triton as plgpu

    width = arrays[0].shape[-1]
    rows_per_block, cols, programs, warps = tiling or (8, 1024, 1024, 4)
    while width % cols:  # widths are multiples of MIN_COLUMN_BLOCK
        cols //= 2
    flat = [a.reshape(-1, width) for a in arrays]
    n_rows = flat[0].shape[0]
    steps = pl.cdiv(n_rows, rows_per_block * programs)  # row blocks per program
    grid = (pl.cdiv(n_rows, rows_per_block * steps), width // cols)

    def kernel(*refs):
        column = pl.program_id(1) * cols + jnp.arange(cols)
        bias = plgpu.load(refs[0].at[column]).astype(jnp.float32)
        first = pl.program_id(0) * rows_per_block * steps

        def one_block(step, sums):
            row = first + step * rows_per_block + jnp.arange(rows_per_block)
            ok = (row < n_rows)[:, None] & (column < width)[None, :]  # columns always fit: gives the 2-D shape
            return block(refs, (row[:, None], column[None, :]), ok, bias, sums)

        sums = jax.lax.fori_loop(0, steps, one_block, jnp.zeros((cols,), jnp.float32))
        if column_sums:
            plgpu.store(refs[-1].at[pl.program_id(0), column], sums)

    out_shape = [jax.ShapeDtypeStruct(flat[0].shape, arrays[0].dtype)]
    if column_sums:
        out_shape.append(jax.ShapeDtypeStruct((grid[0], width), jnp.float32))
    return pl.pallas_call(kernel, grid=grid, name=name, interpret=interpret, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=warps))(b, *flat)
