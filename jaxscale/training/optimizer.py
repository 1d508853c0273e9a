"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay only where it belongs."""
from __future__ import annotations

import jax
import optax

from jaxscale.config import OptimizerConfig

EMBEDDING_PARAMS = ("embed", "positions")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def weight_decay_mask(params: dict, decay_embeddings: bool) -> dict:
    """Decay matrices (ndim >= 2 per layer); never norms or biases; embeddings only if asked."""

    def decays(path, x) -> bool:
        name = path[-1].key
        stacked = path[0].key == "blocks"  # leading `layers` dimension
        if name in EMBEDDING_PARAMS:
            return decay_embeddings
        return x.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: OptimizerConfig, total_steps: int, params: dict) -> tuple[optax.GradientTransformation,
                                                                                   optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=weight_decay_mask(params, cfg.decay_embeddings))
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, adamw), schedule
