"""Matmuls in fp8 with current (per-tensor, just-in-time) scaling: `matmul(spec, x, w, "fp8")`.

Forward operands (activations and weights) go to float8_e4m3fn, the gradient flowing back to float8_e5m2 (more
range, less precision), each with one scale per tensor computed from that tensor's largest magnitude in the same
step, so its values fill the format's range. Per-tensor scales factor out of the sum, so the dot runs on the fp8
values themselves (`lax.dot_general` with fp8 operands, `preferred_element_type` the compute dtype: a mixed
e5m2 x e4m3 dot stays fp8, where jnp.einsum would promote it to float16) and one multiply by the two scales'
product rescales its output. XLA's GPU GEMM rewriter turns a dot of fp8 operands into a cuBLASLt fp8 GEMM on
Hopper and newer; elsewhere (the CPU) XLA computes the same dot by widening the operands. The backward pass keeps
the operands' fp8 copies as residuals and treats rounding as the identity (straight-through), as fp8 training
recipes do.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn  # activations and weights: 3 mantissa bits, largest 448
BACKWARD = jnp.float8_e5m2  # gradients: 2 mantissa bits, largest 57344


def quantize(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """(x / scale in `fp8_dtype`, scale in float32): the per-tensor scale puts x's largest magnitude at fp8's
    largest finite value."""
    largest = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / largest, 1.0)
    # the clip: float8_e4m3fn has no infinity, an overflow would become NaN (amax / scale can round above largest)
    return jnp.clip(x.astype(jnp.float32) / scale, -largest, largest).astype(fp8_dtype), scale


def scaled_dot(spec: str, a: jax.Array, a_scale, b: jax.Array, b_scale, dtype) -> jax.Array:
    """einsum(spec, a * a_scale, b * b_scale) in `dtype`, as one dot_general of the fp8 `a` and `b` (every
    index in exactly two terms: contracted, or kept from one operand) and a transpose to the output's order."""
    inputs, out = spec.split("->")
    a_labels, b_labels = inputs.split(",")
    contracted = [c for c in a_labels if c in b_labels]
    dims = ((tuple(a_labels.index(c) for c in contracted), tuple(b_labels.index(c) for c in contracted)), ((), ()))
    y = jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)
    kept = [c for c in a_labels if c not in contracted] + [c for c in b_labels if c not in contracted]
    y = jnp.transpose(y, [kept.index(c) for c in out])
    return y * (a_scale * b_scale).astype(dtype)


def gradient_specs(spec: str) -> tuple[str, str]:
    """The einsums of the two operands' gradients for a two-operand einsum `spec` whose every index appears in
    exactly two of its three terms (as in every projection: no traces, no index summed within one operand)."""
    inputs, arrow, out = spec.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if not arrow or len(terms) != 2 or "." in spec:
        raise ValueError(f"fp8 matmul needs an einsum of two operands with an explicit output, got {spec!r}")
    x, w = terms
    for label in set(x + w + out):
        if (label in x) + (label in w) + (label in out) != 2:
            raise ValueError(f"fp8 matmul: index {label!r} of {spec!r} must appear in exactly two of its terms")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(spec, x, w) with both operands in float8_e4m3fn and the output gradient in float8_e5m2; x and
    w share one dtype, which the result and both gradients have."""
    return _forward(spec, x, w)[0]


def _forward(spec, x, w):
    xq, x_scale = quantize(x, FORWARD)
    wq, w_scale = quantize(w, FORWARD)
    return scaled_dot(spec, xq, x_scale, wq, w_scale, x.dtype), (xq, x_scale, wq, w_scale)


def _backward(spec, residuals, g):
    xq, x_scale, wq, w_scale = residuals
    gq, g_scale = quantize(g, BACKWARD)
    x_spec, w_spec = gradient_specs(spec)
    return (scaled_dot(x_spec, gq, g_scale, wq, w_scale, g.dtype),
            scaled_dot(w_spec, xq, x_scale, gq, g_scale, g.dtype))


fp8_einsum.defvjp(_forward, _backward)


def matmul(spec: str, x: jax.Array, w: jax.Array, matmul_dtype: str = "compute") -> jax.Array:
    """jnp.einsum(spec, x, w): in the operands' (compute) dtype, or with matmul_dtype="fp8" in fp8 (`fp8_einsum`);
    the result is in the operands' promoted dtype either way."""
    if matmul_dtype == "compute":
        return jnp.einsum(spec, x, w)
    if matmul_dtype != "fp8":
        raise ValueError(f"matmul_dtype={matmul_dtype!r}; choose compute or fp8")
    spec = spec.replace(" ", "")
    gradient_specs(spec)  # refuses, while tracing the forward pass, a spec whose gradients it could not form
    dtype = jnp.result_type(x, w)
    return fp8_einsum(spec, x.astype(dtype), w.astype(dtype))
