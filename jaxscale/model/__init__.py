"""Models as the trainer sees them, and the built-in decoder.

`FlaxModel` (flax_model.py) wraps any Flax model, NNX or Linen, into shapes, logical axis names, `init` and
`loss`. The built-in GPT-2 / Llama decoder (`Transformer`) goes through the same wrapper; `Model` is a
convenience for using it alone: `init(key)` returns a plain dict of parameters and `apply(params, tokens)` the
logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxscale.model.config import PRESETS, ModelConfig
from jaxscale.model.flax_model import LOSS_WEIGHT, FlaxModel, LossFn, flax_model, linen_model, nnx_model
from jaxscale.model.transformer import Transformer

__all__ = ["LOSS_WEIGHT", "PRESETS", "FlaxModel", "LossFn", "Model", "ModelConfig", "Transformer", "flax_model",
           "linen_model", "nnx_model"]


def transformer_factory(cfg: ModelConfig, param_dtype=jnp.float32, decay_embeddings: bool = False):
    """rngs -> the built-in decoder, as a model factory for `nnx_model` / `jaxscale.train(model=...)`."""
    return lambda rngs: Transformer(cfg, rngs=rngs, param_dtype=param_dtype, decay_embeddings=decay_embeddings)


@dataclass(frozen=True)
class Model:
    """The built-in decoder on its own: `init(key)` -> parameters, `apply(params, tokens)` -> logits."""

    cfg: ModelConfig
    flax: FlaxModel

    @classmethod
    def build(cls, cfg: ModelConfig, param_dtype=jnp.float32) -> Model:
        def logits(model, batch, rngs):  # the wrapper needs a loss; apply() calls the model directly
            return model(batch["tokens"]).mean()

        return cls(cfg, nnx_model(transformer_factory(cfg, param_dtype), logits))

    @property
    def logical_axes(self) -> dict:
        return self.flax.logical_axes

    @property
    def shapes(self) -> dict:
        return self.flax.shapes

    def init(self, key: jax.Array) -> dict:
        return self.flax.init(key)

    def apply(self, params: dict, tokens: jax.Array, segment_ids: jax.Array | None = None, **options: Any) -> jax.Array:
        """Logits (batch, length, padded vocab); `options` are Transformer.__call__'s (compute_dtype, remat, ...)."""
        return self.flax.bind(params)(tokens, segment_ids, **options)

    def param_count(self) -> int:
        return self.flax.param_count()
