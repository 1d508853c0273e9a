"""LayerNorm (GPT-2) and RMSNorm (Llama): the XLA reference, and on GPUs a backward pass as one Pallas kernel.

XLA differentiates the norm into a row-wise fusion for the input gradient and separate column sums (over every
token) for the scale and bias gradients, several times the memory bound. The kernel (`norm_gpu`) reads each row
of x and of the incoming gradient once, writes the input gradient, and keeps each program's column sums; XLA
adds those few partial sums up. It is used where it was measured faster than XLA (BENCHMARKS.md, History):
rows of at most 1024, on each GPU's own rows when the mesh splits the batch (data, FSDP; tensor-parallel ranks
repeat the same rows), not under pipeline stages.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxscale.kernels.norm_gpu import norm_backward
from jaxscale.kernels.rows import RowKernelLayout, row_kernel_layout

FUSED_BACKWARD_MAX_WIDTH = 1024  # the widest rows where the kernel was measured faster than XLA
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
