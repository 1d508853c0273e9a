"""The SFT and DPO losses for the built-in decoder, as `loss_fn(model, batch, rngs)` like pretraining's.

SFT: next-token cross entropy weighted by the loss mask (the assistant's tokens), over the packed rows with
their segment ids; with train.microbatches the step weighs each microbatch by its targets (LOSS_WEIGHT), so the
loss is the whole batch's mean over its response tokens however the batch is split.
DPO: each response's log-probability (the sum over its masked tokens) under the policy, against the
reference's from the batch; h = (policy - reference) log-ratio of chosen over rejected.
  sigmoid: -(1 - ε) log σ(β h) - ε log σ(-β h)   (DPO; cDPO with label smoothing ε)
  ipo:     (h - 1 / (2β))²
plus, with posttrain.nll_weight α, α times the chosen responses' mean negative log-likelihood per token (RPO).
With model.moe, both add the experts' balance losses, as pretraining does (`jaxscale.model.moe.moe_objective`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscale.kernels.cross_entropy import cross_entropy, token_cross_entropy
from jaxscale.model import LOSS_WEIGHT, LossFn
from jaxscale.model.moe import moe_objective
from jaxscale.parallel.moe_config import MoEConfig
from jaxscale.posttrain.config import PosttrainConfig


def plus_balance(loss, metrics: dict, moe_stats: dict | None, moe: MoEConfig | None, name: str):
    """(loss, metrics) with the MoE balance losses added and their metrics, the loss without them as `name`;
    unchanged for a dense model (no routing statistics)."""
    if moe_stats is None:
        return loss, metrics
    total, moe_metrics = moe_objective(loss, moe_stats, moe, name)
    return total, {**metrics, **moe_metrics}


def sft_loss(options: dict, moe: MoEConfig | None = None) -> LossFn:
    """`options`: the built-in decoder's call options (training.language_model.model_options); `moe`: its
    model.moe."""

    def loss_fn(model, batch, rngs):
        tokens, mask = batch["tokens"], batch["loss_mask"][:, 1:]
        logits, moe_stats = model.forward(tokens[:, :-1], batch["segment_ids"][:, :-1], **options)
        loss = cross_entropy(logits, tokens[:, 1:], mask)
        # the targets trained on: microbatches and evaluation batches count in proportion to them
        metrics = {"trained_fraction": jnp.mean(mask.astype(jnp.float32)),
                   LOSS_WEIGHT: jnp.sum(mask.astype(jnp.float32))}
        return plus_balance(loss, metrics, moe_stats, moe, "cross_entropy")

    return loss_fn


def pair_log_probs(model, batch, options) -> tuple[jax.Array, jax.Array, dict | None]:
    """(log p(chosen | prompt), log p(rejected | prompt), the MoE routing statistics or None): each the sum of
    the response's masked tokens' log-probabilities, float32 (batch,). Both sides go through one forward pass,
    each pair's two rows side by side (a device keeps its own pairs), so that MoE routing sees them together,
    as one batch, and the experts' bias update counts once per step."""
    tokens = jnp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], 1)
    mask = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], 1)
    pairs, _, length = tokens.shape
    tokens, mask = tokens.reshape(2 * pairs, length), mask.reshape(2 * pairs, length)
    logits, moe_stats = model.forward(tokens[:, :-1], None, **options)
    log_probs = -jnp.sum(token_cross_entropy(logits, tokens[:, 1:]) * mask[:, 1:], axis=-1).reshape(pairs, 2)
    return log_probs[:, 0], log_probs[:, 1], moe_stats

def preference_loss(chosen, rejected, reference_chosen, reference_rejected, *, beta: float, label_smoothing: float,
                    loss: str) -> tuple[jax.Array, dict]:
    """The DPO / cDPO / IPO loss over a batch of pairs' log-probabilities, and its metrics: the implicit rewards'
    margin β (Δchosen - Δrejected), how often chosen's reward is the higher, and the mean log-ratio to the
    reference over both responses (an estimate of the KL on the data's responses, per sequence)."""
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    metrics = {"reward_margin": jnp.mean(beta * h), "reward_accuracy": jnp.mean((h > 0).astype(jnp.float32)),
               "kl_to_reference": jnp.mean(chosen_ratio + rejected_ratio) / 2}
    return jnp.mean(losses), metrics


def dpo_loss(settings: PosttrainConfig, options: dict, moe: MoEConfig | None = None) -> LossFn:

    def loss_fn(model, batch, rngs):
        chosen, rejected, moe_stats = pair_log_probs(model, batch, options)
        loss, metrics = preference_loss(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"],
                                        beta=settings.beta, label_smoothing=settings.label_smoothing,
                                        loss=settings.loss)
        tokens = jnp.sum(batch["chosen_mask"][:, 1:].astype(jnp.float32))
        metrics["chosen_nll"] = -jnp.sum(chosen) / jnp.maximum(tokens, 1.0)
        if settings.nll_weight:
            metrics["preference_loss"] = loss
            loss = loss + settings.nll_weight * metrics["chosen_nll"]
        return plus_balance(loss, metrics, moe_stats, moe, "dpo_loss")

    return loss_fn
