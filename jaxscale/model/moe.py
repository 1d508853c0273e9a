"""The built-in decoder's mixture-of-experts feed-forward part, its balance losses and its metrics.

Routing, dispatch and expert parallelism are in `jaxscale.parallel.experts`; this module adds the shared
experts, the auxiliary-loss-free bias update, and turns the routing statistics into the loss and metrics.

The bias update (DeepSeek-V3's auxiliary-loss-free balancing) moves each expert's router bias by
`bias_update_rate` per step against its load: down for an expert that got more than an even share, up for one
that got less. The bias is a parameter so that it is sharded, checkpointed and restored like any other; its
"gradient" is that direction, attached by `steer_bias`, and the optimizer applies it as plain SGD outside
AdamW and clipping (`jaxscale.training.optimizer`). It travels through the gradient scaled by BIAS_SCALE, so
that the reported gradient norm does not see it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscale.model.config import ModelConfig
from jaxscale.parallel.experts import EXPERT_WEIGHTS, routed_experts
from jaxscale.parallel.moe_config import MoEConfig
from jaxscale.sharding import constrain

SHARED_WEIGHTS = {"gpt2": ("shared_in", "shared_out"), "llama": ("shared_gate", "shared_up", "shared_down")}
BIAS_SCALE = 2.0 ** -20  # a power of two: the direction's signs survive the scaling exactly, in bf16 too


def moe_weights(style: str) -> tuple[str, ...]:
    """The names of a mixture-of-experts layer's own stacked weights."""
    return ("router", "router_bias", *EXPERT_WEIGHTS[style], *SHARED_WEIGHTS[style])


@jax.custom_vjp
def steer_bias(y: jax.Array, bias: jax.Array, load: jax.Array) -> jax.Array:
    """y unchanged; the bias's gradient becomes BIAS_SCALE x sign(load - even load). bias and load: (experts,),
    or (layers, experts) for every layer's at once."""
    return y


def _steer_forward(y, bias, load):
    return y, (bias, load)


def _steer_backward(residuals, gradient):
    bias, load = residuals
    direction = BIAS_SCALE * jnp.sign(load - jnp.mean(load, axis=-1, keepdims=True))
    return gradient, direction.astype(bias.dtype), jnp.zeros_like(load)


steer_bias.defvjp(_steer_forward, _steer_backward)


def shared_mlp(style: str, w: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """The shared experts, as one dense MLP of their total width."""
    if style == "gpt2":
        hidden = jax.nn.gelu(jnp.einsum("btd,df->btf", h, w["shared_in"]))
    else:
        hidden = (jax.nn.silu(jnp.einsum("btd,df->btf", h, w["shared_gate"]))
                  * jnp.einsum("btd,df->btf", h, w["shared_up"]))
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return jnp.einsum("btf,df->btd", hidden, w["shared_out" if style == "gpt2" else "shared_down"])


def moe_mlp(cfg: ModelConfig, w: dict[str, jax.Array], h: jax.Array, dtype) -> tuple[jax.Array, dict]:
    """The mixture-of-experts output for the feed-forward input h (batch, length, embed), and the layer's
    routing statistics. `w` holds this layer's slice of each of `moe_weights`; the router works in float32.
    The bias update is attached for all layers at once, from their totals (`steer_biases`)."""
    m = cfg.moe
    experts = {name: w[name].astype(dtype) for name in EXPERT_WEIGHTS[cfg.style]}
    y, stats = routed_experts(m, cfg.style, h, w["router"], w["router_bias"], experts)
    if m.shared_experts:
        y = y + shared_mlp(cfg.style, {k: w[k].astype(dtype) for k in SHARED_WEIGHTS[cfg.style]}, h)
    return constrain(y, ("batch", "length", "embed")), stats


def no_stats(moe: MoEConfig, layers: int) -> dict:
    """Zero routing totals of `layers` mixture-of-experts layers, to add each layer's into (`add_layer_stats`).

    Every entry is a mean over the batch's tokens, so that a pipeline can take each microbatch's and average
    them (`jaxscale.parallel.run_layers`). The balance loss is not: it multiplies two such means, each
    expert's token share and mean router probability, so both are kept per layer, (layers, experts), and the
    product is taken from the whole batch's (`layer_means`)."""
    per_layer = jnp.zeros((layers, moe.experts), jnp.float32)
    return {"load": per_layer, "probs": per_layer, "z_loss": jnp.zeros((), jnp.float32),
            "dropped": jnp.zeros((), jnp.float32)}


def add_layer_stats(totals: dict, layer_stats: dict, slot: jax.Array) -> dict:
    """totals plus one layer's routing statistics; `slot` (layers,) is one-hot at that layer's place."""
    return {"load": totals["load"] + slot[:, None] * layer_stats["load"],
            "probs": totals["probs"] + slot[:, None] * layer_stats["probs"],
            "z_loss": totals["z_loss"] + layer_stats["z_loss"],
            "dropped": totals["dropped"] + layer_stats["dropped"]}


def layer_means(totals: dict, moe: MoEConfig) -> dict:
    """The totals of every layer as means over the layers: each expert's share of the routed tokens (load), the
    balance loss (aux_loss), the router z-loss and the dropped share."""
    layers = totals["load"].shape[0]
    return {"load": jnp.mean(totals["load"], axis=0),
            "aux_loss": moe.experts * jnp.sum(totals["load"] * totals["probs"]) / layers,
            "z_loss": totals["z_loss"] / layers, "dropped": totals["dropped"] / layers}


def steer_biases(moe: MoEConfig, x: jax.Array, biases: jax.Array, totals: dict) -> jax.Array:
    """x unchanged; with the bias update on, every layer's router bias (layers, experts) gets its direction from
    that layer's load over the whole batch (`steer_bias`)."""
    return steer_bias(x, biases, totals["load"]) if moe.bias_update_rate else x


def moe_objective(loss: jax.Array, stats: dict, moe: MoEConfig, name: str = "cross_entropy"
                  ) -> tuple[jax.Array, dict]:
    """(training loss, metrics) from a loss (next-token cross entropy, or a fine-tuning loss) and the routing
    statistics averaged over the MoE layers: the loss adds the weighted balance and z-losses; the metrics hold
    the loss without them (as `name`), each term, the dropped share, each expert's share of the routed tokens
    (moe_load_<e>) and the busiest expert's share over an even one (moe_load_max: 1.0 is even)."""
    total = loss + moe.aux_loss_weight * stats["aux_loss"] + moe.z_loss_weight * stats["z_loss"]
    metrics = {name: loss, "moe_aux_loss": stats["aux_loss"], "moe_z_loss": stats["z_loss"],
               "moe_dropped": stats["dropped"], "moe_load_max": jnp.max(stats["load"]) * moe.experts,
               **{f"moe_load_{e}": stats["load"][e] for e in range(moe.experts)}}
    return total, metrics
