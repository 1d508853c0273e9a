"""The training state, its shardings, and the jitted train / eval steps."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.config import Config
from jaxscale.model import Model
from jaxscale.parallel import outer_rules, split_microbatches
from jaxscale.sharding import activation_rules, activation_sharding, constrain, param_shardings
from jaxscale.training.elastic import per_device_batch
from jaxscale.training.guards import guard_metrics, inject_nan, squared_norm
from jaxscale.training.loss import cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any


def state_shardings(model: Model, tx: optax.GradientTransformation, mesh: Mesh, param_rules: dict) -> TrainState:
    """Parameters follow the rules; optimizer moments follow their parameter (ZeRO: sharded like it);
    scalars (step, counts) are replicated."""
    params = param_shardings(model.logical_axes, model.shapes, mesh, param_rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, model.shapes)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt)


def init_state(model: Model, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """Initialize directly into the sharded layout: no device ever holds the whole model."""

    def init(key):
        params = model.init(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def batch_sharding(mesh: Mesh, activation_rules_table: dict) -> NamedSharding:
    return activation_sharding(("batch", "length"), mesh, activation_rules_table)


def make_loss_fn(model: Model, config: Config, compute_dtype) -> Callable:
    use_segments = config.data.document_masking

    def loss_fn(params, batch):
        tokens = batch["tokens"]
        segments = batch["segment_ids"][:, :-1] if use_segments else None
        logits = model.apply(params, tokens[:, :-1], segments, compute_dtype=compute_dtype,
                             remat=config.train.remat, scan_unroll=config.train.scan_unroll,
                             pipeline=config.pipeline)
        return cross_entropy(logits, tokens[:, 1:])

    return loss_fn


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(squared_norm(tree))


def in_compute_dtype(grad_fn: Callable, compute_dtype) -> Callable:
    """`grad_fn` differentiated with respect to a compute-dtype copy of the parameters: the gradient sums that
    cross devices (data parallel all-reduce, FSDP reduce-scatter) and FSDP's weight gathers then move that dtype.
    Gradients come back in the parameters' own dtype."""

    def lowered(params, batch):
        low = jax.tree.map(lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                           params)
        loss, grads = grad_fn(low, batch)
        return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    return lowered


def traced_rules(config: Config, mesh: Mesh) -> dict:
    """The activation rules the model is traced under: the configured ones, with the batch outside pipeline
    stages also split over the pipeline ranks (see `outer_rules`). The loaded batch keeps the configured
    layout."""
    return outer_rules(config.sharding.activations, mesh, per_device_batch(config, dict(mesh.shape)))


def make_train_step(model: Model, tx: optax.GradientTransformation, schedule: optax.Schedule, config: Config,
                    mesh: Mesh, shardings: TrainState, compute_dtype) -> Callable:
    loss_fn = make_loss_fn(model, config, compute_dtype)
    grad_fn = jax.value_and_grad(loss_fn)
    if config.train.grad_reduce_dtype == "compute":
        grad_fn = in_compute_dtype(grad_fn, compute_dtype)
    count = config.train.microbatches
    rules = config.sharding.activations
    model_rules = traced_rules(config, mesh)

    def accumulated_grads(params, batch):
        if count == 1:
            return grad_fn(params, batch)

        def one(carry, microbatch):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, microbatch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        microbatches = jax.tree.map(lambda x: constrain(split_microbatches(x, count), (None, "batch", "length")),
                                    batch)
        (loss, grads), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), zeros), microbatches)
        return loss / count, jax.tree.map(lambda g: g / count, grads)

    def train_step(state: TrainState, batch: dict):
        with activation_rules(mesh, model_rules):
            loss, grads = accumulated_grads(state.params, batch)
        loss, grads = inject_nan(loss, grads, state.step, config.guards.inject_nan_at_step)  # testing only
        # tx is wrapped by guard_updates: a bad update (non-finite, loss spike) leaves params and opt state as
        # they were, and says why in the metrics
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step),
                   **guard_metrics(opt_state)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    data_sharding = batch_sharding(mesh, rules)
    return jax.jit(train_step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)


def make_eval_step(model: Model, config: Config, mesh: Mesh, shardings: TrainState, compute_dtype) -> Callable:
    loss_fn = make_loss_fn(model, config, compute_dtype)
    model_rules = traced_rules(config, mesh)

    def eval_step(params, batch):
        with activation_rules(mesh, model_rules):
            return loss_fn(params, batch)

    return jax.jit(eval_step, in_shardings=(shardings.params, batch_sharding(mesh, config.sharding.activations)))
