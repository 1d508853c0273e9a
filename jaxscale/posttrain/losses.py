"""The SFT and DPO losses for the built-in decoder, as `loss_fn(model, batch, rngs)` like pretraining's.

SFT: next-token cross entropy weighted by the loss mask (the assistant's tokens), over the packed rows with
their segment ids. DPO: each response's log-probability (the sum over its masked tokens) under the policy,
against the reference's from the batch; h = (policy - reference) log-ratio of chosen over rejected.
  sigmoid: -(1 - ε) log σ(β h) - ε log σ(-β h)   (DPO; cDPO with label smoothing ε)
  ipo:     (h - 1 / (2β))²
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscale.kernels.cross_entropy import cross_entropy, token_cross_entropy
from jaxscale.model import LossFn
from jaxscale.posttrain.config import PosttrainConfig


def sft_loss(options: dict) -> LossFn:
    """`options`: the built-in decoder's call options (training.language_model.model_options)."""

    def loss_fn(model, batch, rngs):
        tokens, mask = batch["tokens"], batch["loss_mask"][:, 1:]
        logits = model(tokens[:, :-1], batch["segment_ids"][:, :-1], **options)
        loss = cross_entropy(logits, tokens[:, 1:], mask)
        return loss, {"trained_fraction": jnp.mean(mask.astype(jnp.float32))}

    return loss_fn


def response_log_probs(model, tokens, mask, options) -> jax.Array:
    """log p(response | prompt) of each row: the sum of the masked tokens' log-probabilities, float32 (batch,)."""
    logits = model(tokens[:, :-1], None, **options)
    return -jnp.sum(token_cross_entropy(logits, tokens[:, 1:]) * mask[:, 1:], axis=-1)


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


def dpo_loss(settings: PosttrainConfig, options: dict) -> LossFn:

    def loss_fn(model, batch, rngs):
        chosen = response_log_probs(model, batch["chosen_tokens"], batch["chosen_mask"], options)
        rejected = response_log_probs(model, batch["rejected_tokens"], batch["rejected_mask"], options)
        return preference_loss(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"],
                               beta=settings.beta, label_smoothing=settings.label_smoothing, loss=settings.loss)

    return loss_fn
