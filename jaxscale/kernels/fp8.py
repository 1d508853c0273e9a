"""Matmuls in fp8 with current (per-tensor, just-in-time) scaling: `matmul(spec, x, w, "fp8")`.

Forward operands (activations and weights) go to float8_e4m3fn, the gradient flowing back to float8_e5m2 (more
range, less precision), each with one scale per tensor computed from that tensor's largest magnitude in the same
step, so its values fill the format's range. Each operand is quantized, then dequantized (convert to the compute
dtype, multiply by its scale) right before an ordinary einsum: XLA's GPU GEMM rewriter matches that
convert -> multiply -> dot pattern and runs one cuBLASLt fp8 GEMM with the scales as its arguments (on Hopper and
newer), the form JAX's and Flax's fp8 guide recommends over a dot on raw fp8 operands (which takes no scales and
promotes e4m3 x e5m2 to float16). Elsewhere (the CPU) the same program computes the same numbers with a
compute-dtype dot. The backward pass keeps the operands' fp8 copies as residuals and treats rounding as the
identity (straight-through), as fp8 training recipes do.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn  # activations and weights: 3 mantissa bits, largest 448
BACKWARD = jnp.float8_e5m2  # gradients: 2 mantissa bits, largest 57344


def quantize(x: jax.Array, fp8_dtype, dtype) -> tuple[jax.Array, jax.Array]:
    """(x / scale in `fp8_dtype`, scale): the per-tensor scale puts x's largest magnitude at fp8's largest finite
    value. The scale is rounded to `dtype` first, so dequantizing in `dtype` multiplies by exactly the number that
    divided here."""
    largest = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / largest, 1.0).astype(dtype).astype(jnp.float32)
    # the clip: float8_e4m3fn has no infinity, an overflow would become NaN (the rounded scale can land just low)
    return jnp.clip(x.astype(jnp.float32) / scale, -largest, largest).astype(fp8_dtype), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return q.astype(dtype) * scale.astype(dtype)


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
    dtype = x.dtype
    xq, x_scale = quantize(x, FORWARD, dtype)
    wq, w_scale = quantize(w, FORWARD, dtype)
    y = jnp.einsum(spec, dequantize(xq, x_scale, dtype), dequantize(wq, w_scale, dtype),
                   preferred_element_type=dtype)
    return y, (xq, x_scale, wq, w_scale)


def _backward(spec, residuals, g):
    xq, x_scale, wq, w_scale = residuals
    dtype = g.dtype
    gq, g_scale = quantize(g, BACKWARD, dtype)
    g = dequantize(gq, g_scale, dtype)
    x_spec, w_spec = gradient_specs(spec)
    dx = jnp.einsum(x_spec, g, dequantize(wq, w_scale, dtype), preferred_element_type=dtype)
    dw = jnp.einsum(w_spec, dequantize(xq, x_scale, dtype), g, preferred_element_type=dtype)
    return dx, dw


fp8_einsum.defvjp(_forward, _backward)


def matmul(spec: str, x: jax.Array, w: jax.Array, matmul_dtype: str = "compute") -> jax.Array:
    """jnp.einsum(spec, x, w): in the operands' (compute) dtype, or with matmul_dtype="fp8" in fp8 (`fp8_einsum`);
    the result is in the operands' promoted dtype either way."""
    if matmul_dtype == "compute":
        return jnp.einsum(spec, x, w)
    if matmul_dtype != "fp8":
        raise ValueError(f"matmul_dtype={matmul_dtype!r}; choose compute or fp8")
    gradient_specs(spec)  # refuses, while tracing the forward pass, a spec whose gradients it could not form
    dtype = jnp.result_type(x, w)
    return fp8_einsum(spec, x.astype(dtype), w.astype(dtype))
