"""Any Flax model as the trainer sees it: parameters with logical axis names, an init, and a loss.

An NNX model comes as a factory `rngs -> nnx.Module`; a Linen model as a module instance. Either way the trainer
gets the same four things: the shape of every parameter, the logical names of its dimensions (from Flax's own
partitioning metadata: NNX `nnx.with_partitioning` / `out_sharding`, Linen `nn.with_logical_partitioning`), a
pure `init(key)` and a pure `loss(params, batch, key)`. Parameters travel through jit, optax and Orbax as plain
nested dicts of arrays.

The user's loss is `loss_fn(model, batch, rngs)`, where `model` is called as `model(inputs)`: the NNX module
itself, or the Linen module bound to the current parameters. It returns a scalar loss or `(loss, metrics)`.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxscale.errors import ConfigError

LossFn = Callable[[Any, dict, nnx.Rngs], Any]  # (model, batch, rngs) -> loss | (loss, {name: scalar})
# A metric a loss that is a weighted mean may return: the sum of its weights (e.g. the number of targets a masked
# mean divides by). Microbatches (train.microbatches) and evaluation batches are then combined in proportion to
# it, so the loss and gradient are the whole batch's weighted mean however the batch is split; not reported.
LOSS_WEIGHT = "loss_weight"
Axes = tuple  # the logical name of each dimension of one parameter (None: no name)


@dataclass(frozen=True)
class FlaxModel:
    shapes: dict  # jax.ShapeDtypeStruct per parameter, a plain nested dict
    logical_axes: dict  # same tree: the logical names of each parameter's dimensions
    unannotated: tuple[str, ...]  # parameters whose Flax metadata names no dimension (they are replicated)
    decay: dict  # same tree: True / False where a parameter's metadata says `weight_decay=...`, else None
    # same tree: True where a parameter's metadata says `balance_bias=True`: a load-balancing bias whose gradient
    # is its update direction (jaxscale.model.moe), applied by plain SGD outside the optimizer
    balance_bias: dict
    init: Callable[[jax.Array], dict]  # key -> parameters (pure, for jit)
    # (params, batch, key, training=True) -> (loss, metrics); training=False puts NNX modules in eval mode
    # (`module.eval()`: dropout off); a Linen loss_fn sees the same call either way
    loss: Callable[..., tuple[jax.Array, dict]]
    bind: Callable[[dict], Any]  # params -> the model, callable as model(inputs) (outside of a loss too)

    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.shapes))


def flax_model(model, loss_fn: LossFn, example_batch: dict | None = None) -> FlaxModel:
    """An NNX factory (`rngs -> nnx.Module`) or a Linen module; Linen modules are initialized by running
    `loss_fn` under `init`, so `example_batch` (arrays or jax.ShapeDtypeStruct of one global batch) is needed."""
    if isinstance(model, nn.Module):
        if example_batch is None:
            raise ValueError("a Linen model is initialized by running loss_fn on a batch: pass example_batch")
        return linen_model(model, loss_fn, example_batch)
    if isinstance(model, nnx.Module):
        raise TypeError("pass a factory that builds the NNX model, e.g. model=lambda rngs: MyModel(..., rngs=rngs), "
                        "not a built model: jaxscale creates the parameters already sharded")
    if callable(model):
        return nnx_model(model, loss_fn)
    raise TypeError(f"model must be a factory rngs -> nnx.Module or a flax.linen.Module, got {type(model).__name__}")


def split_loss_output(out) -> tuple[jax.Array, dict]:
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    if not isinstance(metrics, dict):
        raise TypeError(f"loss_fn returned (loss, {type(metrics).__name__}); the second item must be a dict of "
                        f"scalar metrics")
    if jnp.shape(loss) != ():
        raise TypeError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
    for name, value in metrics.items():
        if jnp.shape(value) != ():
            raise TypeError(f"metric {name!r} returned by loss_fn has shape {jnp.shape(value)}; metrics are scalars")
    return loss, metrics


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _per_leaf(tree, fn, is_leaf=None) -> dict:
    """A plain nested dict with fn(path, leaf) at every leaf of `tree` (whose nodes are dicts or NNX states)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        node = out
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = fn(path, leaf)
    return out


def _axes_and_unannotated(tree, names_of, is_leaf) -> tuple[dict, tuple[str, ...]]:
    """Each parameter's logical names (None per dimension where its metadata names none), and the parameters
    whose metadata names none."""
    missing = []

    def names(path, leaf) -> Axes:
        given, shape = names_of(leaf), leaf_shape(leaf)
        if given is None:
            missing.append(_path_name(path))
            return (None,) * len(shape)
        if len(given) != len(shape):
            raise ConfigError(f"parameter {_path_name(path)} has shape {shape} but its partitioning metadata "
                              f"names {len(given)} dimensions {tuple(given)}; give one name (or None) per dimension")
        return tuple(given)

    return _per_leaf(tree, names, is_leaf), tuple(missing)


def leaf_shape(leaf) -> tuple[int, ...]:
    value = leaf.get_value() if _is_variable(leaf) else getattr(leaf, "value", leaf)
    return tuple(value.shape)


# ------------------------------------------------------------------------------------------------------------
# Flax NNX


def nnx_model(factory: Callable[[nnx.Rngs], nnx.Module], loss_fn: LossFn) -> FlaxModel:
    def create(key) -> nnx.Module:
        # jaxscale places every parameter itself (jit out_shardings from the rule tables); Flax's eager
        # sharding would need a mesh context and would apply the names without jaxscale's checks.
        with nnx.use_eager_sharding(False):
            module = factory(nnx.Rngs(key))
        if not isinstance(module, nnx.Module):
            raise TypeError(f"the model factory returned {type(module).__name__}, not an nnx.Module")
        return module

    abstract = nnx.eval_shape(lambda: create(jax.random.key(0)))
    graphdef, params, rng_state, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
    if jax.tree.leaves(rest):
        kinds = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=_is_variable)})
        raise ConfigError(f"the model holds variables of type {', '.join(kinds)} besides nnx.Param and RNG "
                          f"streams; jaxscale trains nnx.Param variables and would not update these. Keep them "
                          f"out of the model (pass them in the batch) or make them nnx.Param")
    param_def = jax.tree.structure(params)
    logical_axes, unannotated = _axes_and_unannotated(
        params, lambda v: v.get_metadata().get("out_sharding") or v.get_metadata().get("sharding_names"),
        _is_variable)
    decay = _per_leaf(params, lambda _, v: v.get_metadata().get("weight_decay"), is_leaf=_is_variable)
    balance = _per_leaf(params, lambda _, v: bool(v.get_metadata().get("balance_bias")), is_leaf=_is_variable)
    def init(key) -> dict:
        return nnx.to_pure_dict(nnx.split(create(key), nnx.Param, ...)[1])

    def bind(params_dict: dict, key=None) -> nnx.Module:
        state = jax.tree.unflatten(param_def, jax.tree.leaves(params_dict))
        return nnx.merge(graphdef, state, _fresh_rngs(rng_state, jax.random.key(0) if key is None else key))

    def loss(params_dict: dict, batch: dict, key: jax.Array, training: bool = True):
        model_key, loss_key = jax.random.split(key)
        module = bind(params_dict, model_key)
        if not training:
            module.eval()
        return split_loss_output(loss_fn(module, batch, nnx.Rngs(loss_key)))

    return FlaxModel(shapes=nnx.to_pure_dict(params), logical_axes=logical_axes, unannotated=unannotated,
                     decay=decay, balance_bias=balance, init=init, loss=loss, bind=bind)


def _fresh_rngs(rng_state, key: jax.Array):
    """The RNG streams a module keeps (nnx.Dropout(rngs=...)), made anew from `key` (the step's): each stream's
    key is `key` folded with its path, its count zero, so the numbers drawn are a function of (seed, step)."""

    def one(path, variable):
        if isinstance(variable, nnx.RngKey):
            return variable.replace(jax.random.fold_in(key, zlib.crc32(_path_name(path).encode())))
        value = variable.get_value()
        return variable.replace(jnp.zeros(value.shape, value.dtype))

    return jax.tree_util.tree_map_with_path(one, rng_state, is_leaf=_is_variable)


# ------------------------------------------------------------------------------------------------------------
# Flax Linen


def _is_partitioned(x) -> bool:
    return isinstance(x, nn.Partitioned)


def linen_model(module: nn.Module, loss_fn: LossFn, example_batch: dict) -> FlaxModel:
    batch_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), example_batch)

    def run(bound, batch, rngs):
        return loss_fn(bound, batch, rngs)

    def variables(key) -> dict:
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_spec)
        return module.init({"params": key, "dropout": key}, zeros, nnx.Rngs(key), method=run)

    abstract = jax.eval_shape(variables, jax.random.key(0))
    others = sorted(set(abstract) - {"params"})
    if others:
        raise ConfigError(f"the Linen model creates the collections {', '.join(others)} besides 'params'; "
                          f"jaxscale trains 'params' and would not update these (batch statistics, caches)")
    boxed = abstract["params"]
    logical_axes, unannotated = _axes_and_unannotated(
        boxed, lambda x: x.names if _is_partitioned(x) else None, _is_partitioned)
    shapes = _per_leaf(nn.meta.unbox(boxed), lambda _, s: s)

    def init(key) -> dict:
        return _per_leaf(nn.meta.unbox(variables(key)["params"]), lambda _, x: x)

    def loss(params: dict, batch: dict, key: jax.Array, training: bool = True):
        del training  # a Linen module has no mode to switch; its loss_fn decides
        model_key, loss_key = jax.random.split(key)
        out = module.apply({"params": params}, batch, nnx.Rngs(loss_key), method=run,
                           rngs={"params": model_key, "dropout": model_key})
        return split_loss_output(out)

    return FlaxModel(shapes=shapes, logical_axes=logical_axes, unannotated=unannotated,
                     decay=_per_leaf(shapes, lambda *_: None), balance_bias=_per_leaf(shapes, lambda *_: False),
                     init=init, loss=loss,
                     bind=lambda params: module.bind({"params": params}))
