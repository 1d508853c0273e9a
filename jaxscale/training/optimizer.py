"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay only where it belongs."""
from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxscale.config import OptimizerConfig
from jaxscale.model.flax_model import FlaxModel
from jaxscale.model.moe import BIAS_SCALE
from jaxscale.training.guards import squared_norm, zeros_in_memory_of

STACKED_AXIS = "layers"  # the leading dimension of weights stacked over layers (scanned or pipelined blocks)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def weight_decay_mask(model: FlaxModel, no_decay: list[str]) -> dict:
    """True where a parameter decays: not if its path matches a `no_decay` pattern; else as its metadata's
    `weight_decay` flag says; else if it is a matrix (two or more dimensions besides a stacked `layers` one).
    Nothing depends on what the parameters are called."""

    def decays(path, names) -> bool:
        keys = [getattr(k, "key", k) for k in path]
        if any(fnmatch.fnmatchcase("/".join(map(str, keys)), pattern) for pattern in no_decay):
            return False
        flag = model.decay
        for key in keys:
            flag = flag[key]
        if flag is not None:
            return bool(flag)
        return sum(name != STACKED_AXIS for name in names) >= 2

    return jax.tree_util.tree_map_with_path(decays, model.logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def with_balance_biases(inner: optax.GradientTransformation, flags: dict,
                        rate: float) -> optax.GradientTransformationExtraArgs:
    """`inner` for every parameter but the load-balancing biases (`flags` True): those move by -rate x their
    gradient, which `jaxscale.model.moe` makes their update direction scaled by BIAS_SCALE. `inner` (clipping,
    AdamW) sees zeros in their place, so they count in no norm and no moment."""
    inner = optax.with_extra_args_support(inner)
    step = rate / BIAS_SCALE

    def update(grads, state, params=None, **extra):
        others = jax.tree.map(lambda g, flag: zeros_in_memory_of(g) if flag else g, grads, flags)
        updates, state = inner.update(others, state, params, **extra)
        return jax.tree.map(lambda u, g, flag: -step * g if flag else u, updates, grads, flags), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm`, with operations that keep their operands' memory kind, so that the update
    can be computed in host memory (train.offload_update=host): optax's norm adds each leaf's imaginary part
    squared, an array it creates, and its jnp.where broadcasts the scalar condition into another."""

    def update(updates, state, params=None):
        norm = jnp.sqrt(squared_norm(updates))
        return jax.tree.map(lambda g: lax.select(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm),
                            updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimizerConfig, total_steps: int, model: FlaxModel,
                    balance_rate: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`balance_rate`: how far a load-balancing bias (a mixture-of-experts router's) moves per step."""
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=weight_decay_mask(model, cfg.no_decay))
    clip = [clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    tx = optax.chain(*clip, adamw)
    if any(jax.tree.leaves(model.balance_bias)):
        tx = with_balance_biases(tx, model.balance_bias, balance_rate)
    return tx, schedule
