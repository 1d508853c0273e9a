"""GPT-2's MLP activation, GELU (tanh form) of a matmul output plus its bias: the XLA reference, and on GPUs
two Pallas kernels (`gelu_gpu`).

The forward kernel reads y + b once and writes GELU; the backward kernel reads y and the incoming gradient
once, recomputes GELU's slope from y (the forward output is never kept: the matmul's gradient keeps y anyway),
writes dy and each program's column sums for the bias gradient, which XLA adds up. The forward kernel was
measured faster than XLA's fusion, the backward level with it (BENCHMARKS.md, History). Used on each GPU's own
rows when the mesh splits the batch; XLA's form where the MLP dimension is split (tensor parallelism) or under
pipeline stages.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec

from jaxscale.kernels.gelu_gpu import gelu_backward, gelu_forward
from jaxscale.kernels.rows import RowKernelLayout, row_kernel_layout

ACTIVATION = ("batch", "length", "mlp")  # the logical names of y
MIN_COLUMN_BLOCK = 128  # widths that are not a multiple of this keep XLA's form


def reference(y, b):
    """XLA's form. GELU is recomputed in the backward pass from y, which the matmul's gradient keeps anyway;
    otherwise XLA stores an intermediate of its own, one more (batch, length, mlp) write per layer."""
    return jax.checkpoint(lambda y, b: jax.nn.gelu(y + b))(y, b)


def bias_gelu(y, b):
    """gelu(y + b), tanh form, over an activation (batch, length, mlp) and a bias (mlp,)."""
    layout = row_kernel_layout(ACTIVATION)
    if layout is None or y.shape[-1] % MIN_COLUMN_BLOCK:
        return reference(y, b)
    return bias_gelu_with_kernels(y, b, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bias_gelu_with_kernels(y, b, layout: RowKernelLayout):
    return _forward(y, b, layout)[0]


def _forward(y, b, layout):
    return layout.apply(gelu_forward, in_specs=(layout.spec, PartitionSpec()), out_specs=layout.spec)(y, b), (y, b)


def _backward(layout, saved, dg):
    y, b = saved
    dy, db = layout.apply(gelu_backward, in_specs=(layout.spec, PartitionSpec(), layout.spec),
                          out_specs=(layout.spec, layout.per_device))(y, b, dg)
    return dy, db.sum(0).astype(b.dtype)


bias_gelu_with_kernels.defvjp(_forward, _backward)
