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
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.config import Config
from jaxscale.errors import ConfigError
from jaxscale.model import LOSS_WEIGHT, FlaxModel
from jaxscale.parallel import outer_rules, split_microbatches
from jaxscale.sharding import activation_rules, activation_sharding, constrain, param_shardings
from jaxscale.trace_notes import recording
from jaxscale.training.guards import guard_metrics, inject_nan, squared_norm

STEP_METRICS = ("loss", "grad_norm", "lr")
HOST = "pinned_host"  # the memory kind of offloaded state


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    # DPO with posttrain.reference=frozen: the initial parameters, sharded like `params`, never updated (no
    # optimizer state); checkpointed with the rest, so a resumed run has them exactly
    reference: dict | None = None


def state_shardings(model: FlaxModel, tx: optax.GradientTransformation, mesh: Mesh, param_rules: dict,
                    offload_optimizer: bool = False, offload_params: bool = False,
                    frozen_reference: bool = False) -> TrainState:
    """Parameters follow the rules; optimizer moments follow their parameter (ZeRO: sharded like it); each in
    host memory (`pinned_host`) when offloaded; scalars (step, counts) are replicated on the devices. With
    `frozen_reference`, the state holds a frozen copy of the parameters, sharded like them on the devices."""
    params = param_shardings(model.logical_axes, model.shapes, mesh, param_rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, model.shapes)
    opt = optax.tree_map_params(tx, lambda _, sharding: in_memory(sharding, offload_optimizer), abstract_opt,
                                params, transform_non_params=lambda _: replicated)
    reference = params if frozen_reference else None
    params = jax.tree.map(lambda sharding: in_memory(sharding, offload_params), params)
    return TrainState(step=replicated, params=params, opt_state=opt, reference=reference)


def in_memory(sharding: NamedSharding, on_host: bool) -> NamedSharding:
    return sharding.with_memory_kind(HOST) if on_host else sharding


def on_device(tree, shardings):
    """Arrays of `tree` whose sharding is in host memory, moved to device memory (inside a jitted function)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind("device"))
                        if s.memory_kind == HOST else x, tree, shardings)


def to_host(tree, shardings):
    """Every array of `tree` moved to host memory, sharded as `shardings` say (inside a jitted function)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind(HOST)), tree, shardings)


def in_dtype(tree, dtype):
    """The floating-point arrays of `tree` cast to `dtype`; integers as they are."""
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree)


def compute_copy(params, shardings, compute_dtype):
    """What the forward and backward pass read when the master parameters are in host memory
    (train.offload_params): a compute-dtype copy in device memory (moved, then cast on the device)."""
    return in_dtype(on_device(params, shardings), compute_dtype)


def apply_update(tx: optax.GradientTransformation, grads, loss: jax.Array, state: TrainState,
                 shardings: TrainState, where: str | None) -> tuple[dict, Any]:
    """(parameters, optimizer state) after the optimizer's update, placed as `shardings` say.

    where=None: nothing is offloaded. "device": the offloaded state (moments, master parameters) comes to device
    memory for the update and goes back after; an optimization barrier makes it wait for the gradients, so that
    it takes device memory during the update only, not the whole step (and the master parameters' transfer is
    not merged with the one of `compute_copy`). "host": the gradients, the loss and whatever state is on the
    devices go to host memory instead, and the update is computed there (`compute_on("device_host")`)."""

    def update(grads, opt_state, params, loss):
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state

    if where is None:
        return update(grads, state.opt_state, state.params, loss)
    if where == "host":
        params, opt_state = compute_on("device_host")(jax.jit(update))(
            to_host(grads, shardings.params), to_host(state.opt_state, shardings.opt_state),
            to_host(state.params, shardings.params), to_host(loss, shardings.step))
    else:
        grads, opt_state, params = jax.lax.optimization_barrier((grads, state.opt_state, state.params))
        params, opt_state = update(grads, on_device(opt_state, shardings.opt_state),
                                   on_device(params, shardings.params), loss)
    return jax.device_put(params, shardings.params), jax.device_put(opt_state, shardings.opt_state)


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
        out, grads = grad_fn(in_dtype(params, compute_dtype), batch, key)
        return out, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    return lowered


@contextlib.contextmanager
def tracing_model(config: Config, mesh: Mesh, per_device_batch: int) -> Iterator[None]:
    """The context the model is traced in: the activation rules (jaxscale's and Flax's). On a pipeline mesh, a
    model that never ran its layers through `run_layers` (which notes each pipeline it plans) is refused."""
    with activation_rules(mesh, traced_rules(config, mesh, per_device_batch)), recording("pipeline") as staged:
        yield
    if mesh.shape.get("pipeline", 1) > 1 and not staged:
        raise ConfigError("mesh.pipeline > 1, but the model never ran its layers through "
                          "jaxscale.parallel.run_layers, so there are no stages to cut: keep the repeated blocks "
                          "stacked (nnx.vmap with transform_metadata={nnx.PARTITION_NAME: 'layers'}) and run them "
                          "with run_layers(..., settings=config.pipeline) (README: Bring your own model), or use "
                          "mesh.pipeline=1")


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
    train = config.train
    value_and_grad = jax.value_and_grad(model.loss, has_aux=True)
    if train.grad_reduce_dtype == "compute":
        value_and_grad = in_compute_dtype(value_and_grad, compute_dtype)
    # gradients in the master parameters' dtype, also those of train.offload_params' compute-dtype copy
    master_dtypes = jax.tree.map(lambda s: s.dtype, model.shapes)

    def grad_fn(params, batch, key):
        out, grads = value_and_grad(params, batch, key)
        return out, jax.tree.map(lambda g, dtype: g.astype(dtype), grads, master_dtypes)

    count = train.microbatches
    update_where = train.offload_update if train.offload_optimizer or train.offload_params else None

    def accumulated_grads(params, batch, key):
        """The loss, metrics and gradients of the batch, over train.microbatches; with a LOSS_WEIGHT metric the
        microbatches' losses and gradients in proportion to it, else equally."""
        if count == 1:
            (loss, metrics), grads = grad_fn(params, batch, key)
            return (loss, {k: v for k, v in metrics.items() if k != LOSS_WEIGHT}), grads

        def one(carry, inputs):
            index, microbatch = inputs
            (loss_sum, metric_sums), grad_sum = carry
            (loss, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(key, index))
            if weighted:
                weight = metrics[LOSS_WEIGHT].astype(jnp.float32)
                loss, grads = loss * weight, jax.tree.map(lambda g: g * weight.astype(g.dtype), grads)
            sums = (loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics))
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        microbatches = jax.tree.map(
            lambda x: constrain(split_microbatches(x, count), (None, "batch") + (None,) * (x.ndim - 1)), batch)
        first = jax.tree.map(lambda x: x[0], microbatches)
        metric_shapes = jax.eval_shape(lambda: model.loss(params, first, key)[1])
        weighted = LOSS_WEIGHT in metric_shapes
        zeros = ((jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)),
                 jax.tree.map(lambda p, dtype: jnp.zeros_like(p, dtype=dtype), params, master_dtypes))
        ((loss, sums), grads), _ = jax.lax.scan(one, zeros, (jnp.arange(count), microbatches))
        metrics = {k: v / count for k, v in sums.items() if k != LOSS_WEIGHT}
        if not weighted:
            return (loss / count, metrics), jax.tree.map(lambda g: g / count, grads)
        total = jnp.maximum(sums[LOSS_WEIGHT].astype(jnp.float32), 1e-9)  # all weights 0: the sums are 0 too
        return (loss / total, metrics), jax.tree.map(lambda g: g / total.astype(g.dtype), grads)

    def train_step(state: TrainState, batch: dict):
        params = compute_copy(state.params, shardings.params, compute_dtype) if train.offload_params else state.params
        with tracing_model(config, mesh, per_device_batch):
            if state.reference is not None:
                batch = {**batch, **reference_fn(jax.lax.stop_gradient(state.reference), batch)}
            (loss, model_metrics), grads = accumulated_grads(params, batch, step_key(train.seed, state.step))
        clash = set(model_metrics) & set(STEP_METRICS)
        if clash:
            raise ValueError(f"loss_fn returned metrics named {sorted(clash)}, which jaxscale's step reports "
                             f"itself; rename them")
        loss, grads = inject_nan(loss, grads, state.step, config.guards.inject_nan_at_step)  # testing only
        # tx is wrapped by guard_updates: a bad update (non-finite, loss spike) leaves params and opt state as
        # they were, and says why in the metrics
        params, opt_state = apply_update(tx, grads, loss, state, shardings, update_where)
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

    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=sh.with_memory_kind("device")),
                            model.shapes, shardings.params)
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
        params = on_device(params, shardings.params)  # train.offload_params: the master copy, from host memory
        with tracing_model(config, mesh, per_device_batch):
            loss, metrics = model.loss(params, batch, jax.random.key(config.train.seed), training=False)
        return {"loss": loss, **metrics}

    return jax.jit(eval_step, in_shardings=(shardings.params, data_sharding))
