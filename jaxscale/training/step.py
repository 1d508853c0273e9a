"""The training state, its shardings, and the jitted train / eval steps, for any model (`FlaxModel`)."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.config import Config
from jaxscale.errors import ConfigError
from jaxscale.model import FlaxModel
from jaxscale.parallel import outer_rules, pipeline_settings, split_microbatches
from jaxscale.sharding import activation_rules, activation_sharding, constrain, param_shardings
from jaxscale.training.guards import guard_metrics, inject_nan, squared_norm

STEP_METRICS = ("loss", "grad_norm", "lr")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    # DPO with posttrain.reference=frozen: the initial parameters, sharded like `params`, never updated (no
    # optimizer state); checkpointed with the rest, so a resumed run has them exactly
    reference: dict | None = None


def state_shardings(model: FlaxModel, tx: optax.GradientTransformation, mesh: Mesh, param_rules: dict,
                    offload_optimizer: bool = False, frozen_reference: bool = False) -> TrainState:
    """Parameters follow the rules; optimizer moments follow their parameter (ZeRO: sharded like it), in host
    memory (`pinned_host`) with `offload_optimizer`; scalars (step, counts) are replicated on the devices. With
    `frozen_reference`, the state holds a frozen copy of the parameters, sharded like them."""
    params = param_shardings(model.logical_axes, model.shapes, mesh, param_rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, model.shapes)
    place = (lambda sharding: sharding.with_memory_kind("pinned_host")) if offload_optimizer else (lambda s: s)
    opt = optax.tree_map_params(tx, lambda _, sharding: place(sharding), abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt, reference=params if frozen_reference else None)


def on_device(tree, shardings):
    """Arrays of `tree` whose sharding is in host memory, moved to device memory (inside a jitted function)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind("device"))
                        if s.memory_kind == "pinned_host" else x, tree, shardings)


def on_host(tree, shardings):
    """The inverse of `on_device`: arrays whose sharding is in host memory, moved back there."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s) if s.memory_kind == "pinned_host" else x,
                        tree, shardings)


def init_state(model: FlaxModel, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """Initialize directly into the sharded layout: no device ever holds the whole model."""

    def init(key):
        params = model.init(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          reference=params if shardings.reference is not None else None)

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def state_from_params(params: dict, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The state at step 0 for parameters given (a pretrained model): fresh optimizer moments beside them."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    reference = jax.tree.map(jnp.copy, params) if shardings.reference is not None else None  # its own buffers
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state, reference=reference)


def batch_sharding(mesh: Mesh, activation_rules_table: dict) -> NamedSharding:
    """Every array of a batch is split along its first dimension as the `batch` rule says; the rest of each
    array is whole on every device that holds its rows."""
    return activation_sharding(("batch",), mesh, activation_rules_table)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The randomness of one step (dropout and the like): a function of (seed, step), so resumes are exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(squared_norm(tree))


def in_compute_dtype(grad_fn: Callable, compute_dtype) -> Callable:
    """`grad_fn` differentiated with respect to a compute-dtype copy of the parameters: the gradient sums that
    cross devices (data parallel all-reduce, FSDP reduce-scatter) and FSDP's weight gathers then move that dtype.
    Gradients come back in the parameters' own dtype."""

    def lowered(params, batch, key):
        low = jax.tree.map(lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                           params)
        out, grads = grad_fn(low, batch, key)
        return out, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    return lowered


@contextlib.contextmanager
def tracing_model(config: Config, mesh: Mesh, per_device_batch: int) -> Iterator[None]:
    """The context the model is traced in: the activation rules (jaxscale's and Flax's) and the pipeline
    settings. On a pipeline mesh, a model that never ran its layers through `run_layers` is refused."""
    with activation_rules(mesh, traced_rules(config, mesh, per_device_batch)), \
            pipeline_settings(config.pipeline) as staged_run:
        yield
    if mesh.shape.get("pipeline", 1) > 1 and not staged_run.staged:
        raise ConfigError("mesh.pipeline > 1, but the model never ran its layers through "
                          "jaxscale.parallel.run_layers, so there are no stages to cut: keep the repeated blocks "
                          "stacked (nnx.vmap with transform_metadata={nnx.PARTITION_NAME: 'layers'}) and run them "
                          "with run_layers (README: Bring your own model), or use mesh.pipeline=1")


def traced_rules(config: Config, mesh: Mesh, per_device_batch: int) -> dict:
    """The activation rules the model is traced under: the configured ones, with the batch outside pipeline
    stages also split over the pipeline ranks (see `outer_rules`). The loaded batch keeps the configured
    layout."""
    return outer_rules(config.sharding.activations, mesh, per_device_batch)


def make_train_step(model: FlaxModel, tx: optax.GradientTransformation, schedule: optax.Schedule, config: Config,
                    mesh: Mesh, shardings: TrainState, data_sharding: NamedSharding, per_device_batch: int,
                    compute_dtype, reference_fn: Callable | None = None) -> Callable:
    """`reference_fn(reference params, batch) -> entries added to the batch`, for a state with a frozen
    reference (DPO's reference log-probabilities, computed in the step)."""
    grad_fn = jax.value_and_grad(model.loss, has_aux=True)
    if config.train.grad_reduce_dtype == "compute":
        grad_fn = in_compute_dtype(grad_fn, compute_dtype)
    count = config.train.microbatches

    def accumulated_grads(params, batch, key):
        if count == 1:
            return grad_fn(params, batch, key)

        def one(carry, inputs):
            index, microbatch = inputs
            (loss_sum, metric_sums), grad_sum = carry
            (loss, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(key, index))
            sums = (loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics))
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        microbatches = jax.tree.map(
            lambda x: constrain(split_microbatches(x, count), (None, "batch") + (None,) * (x.ndim - 1)), batch)
        first = jax.tree.map(lambda x: x[0], microbatches)
        metric_shapes = jax.eval_shape(lambda: model.loss(params, first, key)[1])
        zeros = ((jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)),
                 jax.tree.map(jnp.zeros_like, params))
        ((loss, metrics), grads), _ = jax.lax.scan(one, zeros, (jnp.arange(count), microbatches))
        return jax.tree.map(lambda x: x / count, ((loss, metrics), grads))

    def train_step(state: TrainState, batch: dict):
        with tracing_model(config, mesh, per_device_batch):
            if state.reference is not None:
                batch = {**batch, **reference_fn(jax.lax.stop_gradient(state.reference), batch)}
            (loss, model_metrics), grads = accumulated_grads(state.params, batch,
                                                             step_key(config.train.seed, state.step))
        clash = set(model_metrics) & set(STEP_METRICS)
        if clash:
            raise ValueError(f"loss_fn returned metrics named {sorted(clash)}, which jaxscale's step reports "
                             f"itself; rename them")
        loss, grads = inject_nan(loss, grads, state.step, config.guards.inject_nan_at_step)  # testing only
        # tx is wrapped by guard_updates: a bad update (non-finite, loss spike) leaves params and opt state as
        # they were, and says why in the metrics
        # with train.offload_optimizer the moments come in from host memory for the update and go back after
        updates, opt_state = tx.update(grads, on_device(state.opt_state, shardings.opt_state), state.params,
                                       value=loss)
        opt_state = on_host(opt_state, shardings.opt_state)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step),
                   **guard_metrics(opt_state), **model_metrics}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, reference=state.reference), metrics

    return jax.jit(train_step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)


def model_flops(model: FlaxModel, config: Config, mesh: Mesh, shardings: TrainState, batch: dict,
                per_device_batch: int) -> tuple[float | None, bool]:
    """(FLOPs of the model's forward and backward pass over one global batch, all devices together, from XLA's
    cost analysis; whether the program loops over floating-point work). XLA counts a loop's body once, so a model
    that scans over its layers is undercounted: the gradient accumulation loop is left out here and multiplied
    back instead. (The random-bit generator's loops carry integers only and do not count.)"""
    count = config.train.microbatches
    micro = {k: jax.ShapeDtypeStruct((v.shape[0] // count, *v.shape[1:]), v.dtype, sharding=v.sharding)
             for k, v in batch.items()}

    def grads(params, batch):
        with tracing_model(config, mesh, per_device_batch):
            return jax.grad(lambda p: model.loss(p, batch, jax.random.key(0))[0])(params)

    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model.shapes,
                            shardings.params)
    compiled = jax.jit(grads).lower(abstract, micro).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    loops = any(re.search(r"\b(bf16|f16|f32|f64)\[", line.split(" while(")[0])
                for line in compiled.as_text().splitlines() if " while(" in line)
    return (float(flops) * mesh.size * count if flops and flops > 0 else None), loops


def make_eval_step(model: FlaxModel, config: Config, mesh: Mesh, shardings: TrainState,
                   data_sharding: NamedSharding, per_device_batch: int) -> Callable:
    """(params, batch) -> {"loss": ..., **the loss function's metrics}, with a fixed key."""

    def eval_step(params, batch):
        with tracing_model(config, mesh, per_device_batch):
            loss, metrics = model.loss(params, batch, jax.random.key(config.train.seed), training=False)
        return {"loss": loss, **metrics}

    return jax.jit(eval_step, in_shardings=(shardings.params, data_sharding))
