"""The model as the trainer sees it: pure parameter dicts in, logits out.

`Model` wraps the Flax NNX `Transformer` once: its graph definition, the logical axis names and shapes of
every parameter, and two pure functions, `init(key)` and `apply(params, tokens)`. Parameters travel through
jit, optax and Orbax as plain nested dicts of arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.model.config import PRESETS, ModelConfig
from jaxscale.model.transformer import Transformer
from jaxscale.parallel import PipelineConfig

__all__ = ["Model", "ModelConfig", "PRESETS", "Transformer"]


def _is_param(x) -> bool:
    return isinstance(x, nnx.Variable)


@dataclass(frozen=True)
class Model:
    cfg: ModelConfig
    param_dtype: Any
    graphdef: Any
    state_def: Any  # tree structure of the NNX state, to rebuild it from a pure dict
    logical_axes: dict  # same tree as the params: a tuple of logical names per parameter
    shapes: dict  # same tree: jax.ShapeDtypeStruct per parameter

    @classmethod
    def build(cls, cfg: ModelConfig, param_dtype=jnp.float32) -> Model:
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
        graphdef, state = nnx.split(abstract)
        axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.logical_axes, state, is_leaf=_is_param))
        shapes = nnx.to_pure_dict(state)
        return cls(cfg, param_dtype, graphdef, jax.tree.structure(state), axes, shapes)

    def init(self, key: jax.Array) -> dict:
        model = Transformer(self.cfg, rngs=nnx.Rngs(key), param_dtype=self.param_dtype)
        return nnx.to_pure_dict(nnx.state(model))

    def apply(self, params: dict, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
              compute_dtype=jnp.float32, remat: str = "none", scan_unroll: int = 1,
              pipeline: PipelineConfig | None = None) -> jax.Array:
        state = jax.tree.unflatten(self.state_def, jax.tree.leaves(params))
        model = nnx.merge(self.graphdef, state)
        return model(tokens, segment_ids, compute_dtype=compute_dtype, remat=remat, scan_unroll=scan_unroll,
                     pipeline=pipeline)

    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.shapes))
