"""Logical axis names -> mesh axes.

The model names every parameter and large activation dimension (batch, length, embed, heads, mlp, vocab, ...).
Two rule tables in the config map those names onto mesh axes: one for parameters, one for activations. FSDP,
tensor parallelism and their mixes are nothing but entries in these tables, so the model never changes for a
layout.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import ConfigError

Rules = dict[str, Any]  # logical name -> mesh axis | [mesh axes] | None


def rule_axes(target: str | Sequence[str] | None) -> list[str]:
    """The mesh axes a rule (or a PartitionSpec entry) names: one axis, several, or none."""
    return [target] if isinstance(target, str) else list(target or ())


def rule_target(name: str | None, rules: Rules, mesh: Mesh | None = None):
    """What a logical name maps to: its rule; with no rule, the mesh axis of that name (a model may annotate with
    mesh axis names directly, as `nn.with_partitioning` does), else None (replicated)."""
    if name is None:
        return None
    if name in rules:
        return rules[name]
    return name if mesh is not None and name in mesh.shape else None


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `names`.

    A mesh axis is used at most once per array (the first dimension that asks for it gets it), and axes of
    size 1 are dropped so specs print the layout that is really in effect.
    """
    used: set[str] = set()
    spec = []
    for name in names:
        axes = rule_axes(rule_target(name, rules, mesh))
        axes = [a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1)]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def split_count(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """Into how many parts one PartitionSpec entry splits its dimension."""
    return math.prod(mesh.shape[axis] for axis in rule_axes(axes))


def _is_names(x) -> bool:
    return isinstance(x, tuple)


def param_shardings(logical_axes: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for each parameter. Every logical name needs a rule (or must be a mesh axis), and a
    dimension a rule splits must divide evenly over its mesh axes."""

    def one(path, names, shape):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        for dim, name in enumerate(names):
            if name is not None and name not in rules and name not in mesh.shape:
                raise ConfigError(
                    f"parameter {where} dimension {dim} is named {name!r}, which has no rule "
                    f"in sharding.params; add one, e.g. --set sharding.params.{name}=null (replicated) or "
                    f"=fsdp / =tensor (split over that mesh axis)")
        spec = logical_to_spec(names, rules, mesh)
        for dim, (size, axes) in enumerate(zip(shape.shape, spec)):
            ways = split_count(mesh, axes)
            if size % ways:
                raise ConfigError(
                    f"parameter {where} dimension {dim} ({names[dim]}={size}) cannot be split "
                    f"{ways} ways over mesh axes {axes}; change sharding.params.{names[dim]} or the mesh sizes")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, logical_axes, shapes, is_leaf=_is_names)


def names_used(logical_axes: Any) -> set[str]:
    """Every logical name some parameter's dimension carries."""
    return {n for names in jax.tree.leaves(logical_axes, is_leaf=_is_names) for n in names if n is not None}


def flax_rules(rules: Rules) -> tuple:
    """A rule table in the form of Flax's logical axis rules: ((name, mesh axis | (mesh axes) | None), ...)."""
    return tuple((name, tuple(target) if isinstance(target, list) else target) for name, target in rules.items())


# Activation annotations: the train step installs the mesh and rules while it is traced, both for jaxscale's
# `constrain(x, names)` and as Flax's logical axis rules and mesh, so that `nn.with_logical_constraint` and
# `jax.lax.with_sharding_constraint` inside any model take effect. Outside that context `constrain` is a no-op,
# which is what a plain single-device forward pass wants.
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxscale_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), flax_spmd.logical_axis_rules(flax_rules(rules)):
            yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def current_activation_rules() -> tuple[Mesh, Rules] | None:
    """The mesh and rules `activation_rules` installed, or None outside it (a plain single-device call)."""
    return _ACTIVATION_CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    spec = logical_to_spec(names, rules, mesh)
    inner = jax.sharding.get_abstract_mesh()
    if inner.manual_axes:  # inside shard_map (1F1B's stages): name the mesh with its manual axes
        return jax.lax.with_sharding_constraint(x, NamedSharding(inner, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def activation_split(name: str) -> int:
    """How many parts the active activation rules split the logical dimension `name` into (1 outside them)."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return 1
    mesh, rules = context
    return split_count(mesh, logical_to_spec((name,), rules, mesh)[0])


def activation_sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))
