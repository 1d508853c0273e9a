"""A mixture-of-experts feed-forward layer: top-k routing, balance statistics, and expert parallelism.

Each device routes its own tokens: the router's probabilities pick `top_k` experts per token (a per-expert
bias, if balancing by bias, shifts the choice but not the weights), each (token, choice) gets a slot in its
expert's buffer (first choices before second ones, tokens past the expert's capacity dropped), and the
buffers (experts, capacity, embed) go to the experts. With an `expert` mesh axis > 1 each rank holds
experts / ranks experts: one all-to-all sends every expert its rows from every rank, the experts run, and a
second all-to-all brings the results back, where each token sums its experts' outputs weighted by their
gates. It runs inside `jax.shard_map` over the whole mesh: tokens split as the activation rules split the
batch and length, each expert's hidden width split as they split `mlp` (partial outputs summed there), the
rest of the experts' weights gathered at the boundary as FSDP gathers any weight.

The statistics (each expert's share of the routed tokens, the mean router probabilities, the balance loss made
of those two, the router z-loss, the dropped share) are means over all tokens of the call, the same whatever
the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxscale.errors import ConfigError
from jaxscale.parallel.moe_config import MoEConfig
from jaxscale.sharding import current_activation_rules, logical_to_spec, rule_axes

EXPERT_AXIS = "expert"
EXPERT_WEIGHTS = {"gpt2": ("expert_in", "expert_out"), "llama": ("expert_gate", "expert_up", "expert_down")}


@dataclass(frozen=True)
class ExpertAxes:
    """The mesh axes the routed computation sees inside shard_map; empty on one device without a mesh."""

    exchange: str | None = None  # the expert axis, where it is > 1
    tokens: tuple[str, ...] = ()  # axes that split the tokens: statistics are means over them
    hidden: tuple[str, ...] = ()  # axes that split each expert's hidden width: outputs are summed over them


def route(logits: jax.Array, bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(choice (tokens, top_k) expert ids, gates (tokens, top_k), probabilities (tokens, experts)). The bias
    moves the choice only, added to the logits (where, unlike on saturated probabilities, one bias shifts every
    token's preference alike); with top_k > 1 the gates are the chosen probabilities normalized to sum to one."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, choice = jax.lax.top_k(logits + jax.lax.stop_gradient(bias), top_k)
    gates = jnp.take_along_axis(probs, choice, axis=-1)
    if top_k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return choice, gates, probs


def slots(choice: jax.Array, experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(position of each (token, choice) in its expert's buffer, whether it fits the capacity). Every token's
    first choice is placed before any second choice, so drops fall on the later choices first."""
    tokens, top_k = choice.shape
    one_hot = jax.nn.one_hot(choice.T.reshape(-1), experts, dtype=jnp.int32)  # choice-major order
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1).reshape(top_k, tokens).T
    return position, position < capacity


def expert_mlp(style: str, weights: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """x (experts, rows, embed) through each expert's MLP; weights (experts, embed, hidden)."""
    if style == "gpt2":
        hidden = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", x, weights["expert_in"]))
        return jnp.einsum("ecf,edf->ecd", hidden, weights["expert_out"])
    hidden = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, weights["expert_gate"]))
              * jnp.einsum("ecd,edf->ecf", x, weights["expert_up"]))
    return jnp.einsum("ecf,edf->ecd", hidden, weights["expert_down"])


def grouped_expert_mlp(style: str, weights: dict[str, jax.Array], x: jax.Array, sizes: jax.Array) -> jax.Array:
    """x (rows, embed), sorted by expert with sizes[e] rows for expert e, through each row's expert's MLP as
    grouped matmuls (`jax.lax.ragged_dot`); weights (experts, embed, hidden)."""
    def up(name):
        return jax.lax.ragged_dot(x, weights[name], sizes)

    def down(hidden, name):
        return jax.lax.ragged_dot(hidden, weights[name].swapaxes(1, 2), sizes)

    if style == "gpt2":
        return down(jax.nn.gelu(up("expert_in")), "expert_out")
    return down(jax.nn.silu(up("expert_gate")) * up("expert_up"), "expert_down")


def grouped_routing(moe: MoEConfig, style: str, axes: ExpertAxes, x: jax.Array, choice: jax.Array,
                    gates: jax.Array, weights: dict[str, jax.Array]) -> jax.Array:
    """Dropless routing without buffers: the (token, choice) rows sorted by expert, the experts run on exactly
    their rows, the results put back in token order and summed with the gates. x (tokens, embed)."""
    tokens, d = x.shape
    flat = choice.reshape(-1)  # token-major: row i is token i // top_k's choice i % top_k
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=moe.experts).astype(jnp.int32)
    out = grouped_expert_mlp(style, weights, x[order // moe.top_k], sizes)
    if axes.hidden:
        out = jax.lax.psum(out, axes.hidden)
    rows = out[jnp.argsort(order)].reshape(tokens, moe.top_k, d)
    return jnp.einsum("nkd,nk->nd", rows, gates.astype(x.dtype))


def _mean(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.pmean(x, axes) if axes else x


def routed_on_device(moe: MoEConfig, style: str, axes: ExpertAxes, x: jax.Array, router: jax.Array,
                     bias: jax.Array, weights: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """One device's tokens x (..., embed) through their routed experts; `weights` holds this device's experts.
    Returns the output (x's shape) and the step-wide statistics."""
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)
    tokens, experts = x.shape[0], moe.experts
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), router.astype(jnp.float32))
    choice, gates, probs = route(logits, bias, moe.top_k)
    if moe.grouped_matmul:
        y = grouped_routing(moe, style, axes, x, choice, gates, weights).reshape(shape)
        return y, _statistics(axes, logits, choice, probs, jnp.ones(choice.shape, bool), experts)
    capacity = moe.capacity(tokens)
    position, kept = slots(choice, experts, capacity)

    # Dispatch: each kept (token, choice) into its expert's buffer; a dropped one points past the end.
    where = jnp.where(kept, position, capacity)
    buffer = jnp.zeros((experts, capacity, d), x.dtype).at[choice, where].add(
        jnp.broadcast_to(x[:, None], (tokens, moe.top_k, d)), mode="drop")
    ranks = jax.lax.axis_size(axes.exchange) if axes.exchange else 1
    local = experts // ranks
    if axes.exchange:  # rows for expert e go to the rank that holds it; they come back in the same order
        buffer = jax.lax.all_to_all(buffer, axes.exchange, 0, 0, tiled=True)
    rows = buffer.reshape(ranks, local, capacity, d).swapaxes(0, 1).reshape(local, ranks * capacity, d)
    out = expert_mlp(style, weights, rows)
    if axes.hidden:
        out = jax.lax.psum(out, axes.hidden)
    out = out.reshape(local, ranks, capacity, d).swapaxes(0, 1).reshape(experts, capacity, d)
    if axes.exchange:
        out = jax.lax.all_to_all(out, axes.exchange, 0, 0, tiled=True)

    picked = out.at[choice, jnp.minimum(position, capacity - 1)].get()  # (tokens, top_k, embed)
    weight = jnp.where(kept, gates, 0).astype(x.dtype)
    y = jnp.einsum("nkd,nk->nd", picked, weight).reshape(shape)
    return y, _statistics(axes, logits, choice, probs, kept, experts)


def _statistics(axes: ExpertAxes, logits, choice, probs, kept, experts: int) -> dict:
    share = jnp.mean(jax.nn.one_hot(choice, experts, dtype=jnp.float32), axis=(0, 1))  # routed share per expert
    share, mean_probs = _mean(share, axes.tokens), _mean(jnp.mean(probs, axis=0), axes.tokens)
    return {
        "load": share,
        "probs": mean_probs,
        "aux_loss": experts * jnp.sum(share * mean_probs),
        "z_loss": _mean(jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2), axes.tokens),
        "dropped": 1 - _mean(jnp.mean(kept.astype(jnp.float32)), axes.tokens),
    }


def routed_experts(moe: MoEConfig, style: str, x: jax.Array, router: jax.Array, bias: jax.Array,
                   weights: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """x (batch, length, embed) through the routed experts: on the one device there is, or, inside a traced
    mesh, per device under shard_map with the experts split over the `expert` axis."""
    context = current_activation_rules()
    if context is None:
        return routed_on_device(moe, style, ExpertAxes(), x, router, bias, weights)
    mesh, rules = context
    token_spec = logical_to_spec(("batch", "length", None), rules, mesh)
    token_axes = tuple(a for entry in token_spec for a in rule_axes(entry))
    exchange = EXPERT_AXIS if mesh.shape.get(EXPERT_AXIS, 1) > 1 else None
    if exchange and exchange not in token_axes:
        raise ConfigError(f"mesh.expert={mesh.shape[EXPERT_AXIS]} splits the experts, but the activation rules "
                          f"do not split the tokens over it (sharding.activations.batch="
                          f"{rules.get('batch')!r}); add expert to that list, e.g. [data, fsdp, expert]")
    hidden = tuple(a for a in rule_axes(logical_to_spec(("mlp",), rules, mesh)[0])
                   if a not in token_axes and a != exchange)
    axes = ExpertAxes(exchange, token_axes, hidden)
    weight_spec = PartitionSpec(exchange, None, hidden or None)

    def on_device(x, router, bias, weights):
        return routed_on_device(moe, style, axes, x, router, bias, weights)

    stats_spec = dict.fromkeys(("load", "probs", "aux_loss", "z_loss", "dropped"), PartitionSpec())
    return jax.shard_map(on_device, mesh=mesh,
                         in_specs=(token_spec, PartitionSpec(), PartitionSpec(), {k: weight_spec for k in weights}),
                         out_specs=(token_spec, stats_spec))(x, router, bias, weights)
