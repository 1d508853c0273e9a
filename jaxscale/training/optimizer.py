"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay only where it belongs."""
from __future__ import annotations

import fnmatch

import jax
import optax

from jaxscale.config import OptimizerConfig
from jaxscale.model.flax_model import FlaxModel

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


def build_optimizer(cfg: OptimizerConfig, total_steps: int, model: FlaxModel) -> tuple[optax.GradientTransformation,
                                                                                      optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=weight_decay_mask(model, cfg.no_decay))
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, adamw), schedule
