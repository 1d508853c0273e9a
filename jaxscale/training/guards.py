"""Guards against bad updates.

Inside the jitted step, an update whose loss or gradient norm is not finite, or whose loss spikes above
`spike_factor` x its running average, is dropped: the parameters and the optimizer state stay as they were,
and the skip is counted. The guard wraps the optimizer (like `optax.apply_if_finite`), so its running
average lives in the optimizer state: it is sharded, checkpointed and restored with everything else.

On the host, `GuardMonitor` reads each step's verdict one step late (the next step is already queued, so the
device never waits) and turns skips into events; with `guards.on_nonfinite=rollback` the loop then restores
the last checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxscale.config import GuardsConfig

SKIP_REASONS = {1: "nonfinite", 2: "loss_spike"}  # skip_reason metric value -> event name; 0: applied


class GuardState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    loss_average: jax.Array  # exponential moving average of the losses of applied updates (not debiased)
    applied: jax.Array  # updates applied so far: debiases the average and delays the spike check
    skipped: jax.Array  # updates skipped so far
    skip_reason: jax.Array  # of the latest update: 0 applied, 1 non-finite loss or gradients, 2 loss spike


def squared_norm(tree) -> jax.Array:
    """Not finite if any element is NaN or Inf, or if the gradients are so large that their squares overflow
    float32 (a blow-up as well)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def zeros_in_memory_of(x: jax.Array) -> jax.Array:
    """Zeros shaped like `x`, computed from it (a comparison's 0 or 1, times 0: finite even where x is NaN or
    Inf), so they are typed in x's memory. Inside an update computed in host memory (train.offload_update=host)
    an array created from nothing (jnp.zeros_like) is typed device memory, and operations take one kind only."""
    return (x != x).astype(x.dtype) * 0


def guard_updates(inner: optax.GradientTransformation,
                  config: GuardsConfig) -> optax.GradientTransformationExtraArgs:
    """`inner`, except that an update is replaced by zeros and `inner`'s state kept when it is bad.

    `update` needs the step's loss as the keyword argument `value` (the optax convention)."""
    decay = 1.0 - 1.0 / config.spike_window

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return GuardState(inner.init(params), jnp.zeros((), jnp.float32), zero, zero, zero)

    def update(grads, state: GuardState, params=None, *, value, **unused_extra_args):
        loss = value.astype(jnp.float32)
        reason = jnp.where(jnp.isfinite(loss) & jnp.isfinite(squared_norm(grads)), 0, 1)
        if config.spike_factor:
            average = state.loss_average / (1.0 - decay ** state.applied.astype(jnp.float32))
            spike = (state.applied >= config.spike_window) & (loss > config.spike_factor * average)
            reason = jnp.where((reason == 0) & spike, 2, reason)
        applied = reason == 0
        updates, inner_state = inner.update(grads, state.inner, params)
        # lax.select takes the scalar `applied` as it is; jnp.where would broadcast it into a new array
        updates = jax.tree.map(lambda u: lax.select(applied, u, zeros_in_memory_of(u)), updates)
        inner_state = jax.tree.map(lambda new, old: lax.select(applied, new, old), inner_state, state.inner)
        new_average = decay * state.loss_average + (1.0 - decay) * jnp.where(applied, loss, 0.0)
        return updates, GuardState(
            inner=inner_state,
            loss_average=jnp.where(applied, new_average, state.loss_average),
            applied=state.applied + applied.astype(jnp.int32),
            skipped=state.skipped + (~applied).astype(jnp.int32),
            skip_reason=reason.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init, update)


def guard_metrics(opt_state: GuardState) -> dict[str, jax.Array]:
    return {"skip_reason": opt_state.skip_reason, "skipped_updates": opt_state.skipped}


def inject_nan(loss: jax.Array, grads, step: jax.Array, at_step: int):
    """Testing only: the loss and gradients of step `at_step` (1-based, as in metrics.jsonl) become NaN.

    Multiplying by NaN after the backward pass equals differentiating the NaN-scaled loss (the gradient is
    linear in a constant factor), so the fault takes the path a real overflow takes: guard, optimizer,
    metrics."""
    if not at_step:
        return loss, grads
    factor = jnp.where(step + 1 == at_step, jnp.nan, 1.0).astype(loss.dtype)
    return loss * factor, jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


@dataclass
class GuardEvent:
    step: int  # as in metrics.jsonl: the update that read batch step - 1
    reason: str  # nonfinite | loss_spike
    loss: float
    grad_norm: float


class GuardMonitor:
    """Reads each step's guard verdict one step late, so the device never waits for the host."""

    def __init__(self):
        self.pending: tuple[int, dict] | None = None
        self.consecutive_skips = 0  # updates skipped in a row, up to the latest verdict read

    def push(self, step_index: int, metrics: dict[str, jax.Array]) -> GuardEvent | None:
        """Step `step_index` (0-based) was just dispatched; returns the previous step's event, if any."""
        event = self.flush()
        self.pending = (step_index, metrics)
        return event

    def flush(self) -> GuardEvent | None:
        """The verdict of the latest dispatched step (waits for it)."""
        if self.pending is None:
            return None
        step_index, metrics = self.pending
        self.pending = None
        values = jax.device_get({k: metrics[k] for k in ("skip_reason", "loss", "grad_norm")})
        reason = int(values["skip_reason"])
        self.consecutive_skips = self.consecutive_skips + 1 if reason else 0
        if reason == 0:
            return None
        return GuardEvent(step_index + 1, SKIP_REASONS[reason], float(values["loss"]),
                          float(values["grad_norm"]))
