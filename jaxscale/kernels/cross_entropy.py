"""Next-token cross-entropy, without a float32 copy of the (batch, length, vocab) logits ever stored.

Written plainly (logsumexp, then pick the target logit), XLA reads the logits three times forward: for the max,
for the sum of exponentials, for the target. Here one variadic reduction finds the max and the target logit
together, so the forward reads them twice and the backward once more. (An online softmax as one XLA reduction
is no faster: its two exponentials per element make it compute bound.)

On GPUs a Pallas kernel (`cross_entropy_gpu`) does better (each device on its own rows; XLA's form where the
vocabulary is split): each program reads its rows once for the max and the normalizer (an online softmax per
column block, one exponential per element) and, when a gradient is wanted, a second time, mostly from L2, to
write softmax minus one-hot already scaled for the mean. The backward pass then only scales that by the
incoming cotangent, which XLA drops when it is the constant 1 of a loss being differentiated. Figures:
BENCHMARKS.md, History.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxscale.kernels.cross_entropy_gpu import softmax_kernel
from jaxscale.kernels.rows import RowKernelLayout, row_kernel_layout

LOGITS = ("batch", "length", "vocab")  # their logical names; the kernel needs the vocabulary whole on a device


def _is_target(logits, targets):
    """True where the vocabulary index is the target; a compare against an iota, which fuses where indexing
    (and its scatter gradient) would not."""
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


def _max_and_target(a, b):
    return jnp.maximum(a[0], b[0]), a[1] + b[1]


def _normalizer_and_target(logits, targets):
    """logits (..., vocab), targets (...) -> (log of the softmax normalizer, target logit), both float32."""
    x = logits.astype(jnp.float32)
    top, target = jax.lax.reduce((x, jnp.where(_is_target(x, targets), x, 0.0)), (-jnp.inf, 0.0), _max_and_target,
                                 (x.ndim - 1,))
    total = jnp.sum(jnp.exp(x - top[..., None]), axis=-1)
    return top + jnp.log(total), target


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean over all positions of -log softmax(logits)[target]; logits (..., vocab), targets (...) int. With
    `weights` (shaped like targets; a loss mask) the weighted mean, sum(w * loss) / sum(w) (0 where all weights
    are 0). Under a traced mesh the logits are (batch, length, vocab)."""
    if weights is not None:
        weights = weights.astype(jnp.float32)
    layout = row_kernel_layout(LOGITS)
    if layout is not None:
        return kernel_cross_entropy(logits, targets, weights, layout)
    return fused_cross_entropy(logits, targets, weights)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] at each position (float32, shaped like targets), differentiable as written:
    for losses over sums of a sequence's tokens (preference losses)."""
    log_normalizer, target = _normalizer_and_target(logits, targets)
    return log_normalizer - target


def _mean_scale(weights, count: int):
    """What each position's loss counts in the mean: 1 / count, or w / sum(w)."""
    if weights is None:
        return 1.0 / count
    return weights / jnp.maximum(jnp.sum(weights), 1e-9)


@jax.custom_vjp
def fused_cross_entropy(logits, targets, weights=None):
    return _forward(logits, targets, weights)[0]


def _forward(logits, targets, weights):
    log_normalizer, target = _normalizer_and_target(logits, targets)
    losses = log_normalizer - target
    loss = jnp.mean(losses) if weights is None else jnp.sum(losses * _mean_scale(weights, losses.size))
    return loss, (logits, targets, weights, log_normalizer)


def _backward(residuals, grad):
    logits, targets, weights, log_normalizer = residuals
    # softmax minus the one-hot target, computed and written in one pass, in the logits' dtype
    probs = jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None])
    scale = grad * _mean_scale(weights, log_normalizer.size)
    if weights is not None:
        scale = scale[..., None]
    return ((probs - _is_target(logits, targets)) * scale).astype(logits.dtype), None, None


fused_cross_entropy.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_cross_entropy(logits, targets, weights, layout: RowKernelLayout):
    return _kernel_forward(logits, targets, weights, layout, gradient=False)[0]


def _kernel_forward(logits, targets, weights, layout, gradient=True):
    # each device on its own rows; the gradient is scaled by the count of all positions, not of its own
    kernel = functools.partial(softmax_kernel, gradient=gradient, mean_over=targets.size)
    losses, logits_gradient = layout.apply(kernel, in_specs=(layout.spec, layout.rows),
                                           out_specs=(layout.rows, layout.spec if gradient else None))(logits, targets)
    if weights is None:
        return jnp.mean(losses), (logits_gradient, None)
    # the kernel's gradient is (softmax - one-hot) / count; weighting scales each position to w / sum(w)
    position_scale = _mean_scale(weights, targets.size) * targets.size
    return jnp.sum(losses * _mean_scale(weights, targets.size)), (logits_gradient, position_scale)


def _kernel_backward(layout, residuals, grad):
    logits_gradient, position_scale = residuals
    if position_scale is not None:
        grad = grad * position_scale[..., None]
    return logits_gradient * grad.astype(logits_gradient.dtype), None, None


kernel_cross_entropy.defvjp(_kernel_forward, _kernel_backward)
