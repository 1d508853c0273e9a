"""The built-in decoder through the same interface as any user model: a factory and a loss function.

Batches of the configured text data hold `tokens` and `segment_ids`, each (batch, seq_len + 1): the model
reads the first seq_len tokens and predicts the last seq_len. With `data.document_masking` attention stays
inside each packed document.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscale.config import Config
from jaxscale.errors import ConfigError
from jaxscale.kernels.cross_entropy import cross_entropy
from jaxscale.model import LossFn, transformer_factory
from jaxscale.model.moe import moe_objective


def compute_dtype_for(config: Config, platform: str):
    """`platform`: that of the devices the step is compiled for (not the host's default backend)."""
    name = config.train.compute_dtype
    if name == "auto":
        name = "float32" if platform == "cpu" else "bfloat16"
    return jnp.dtype(name)


def builtin_factory(config: Config):
    return transformer_factory(config.model, jnp.dtype(config.train.param_dtype), config.optimizer.decay_embeddings)


def model_options(config: Config, platform: str) -> dict:
    """The built-in decoder's call options: the config's compute dtype (on `platform`), remat, scan and pipeline
    settings, and the matmuls' dtype."""
    if config.train.matmul_dtype == "fp8" and platform == "tpu":
        # no fp8 matrix unit on v5e/v5p/v6e: the scaled fp8 round trip would run as bfloat16 matmuls plus extra work
        raise ConfigError("train.matmul_dtype=fp8 runs fp8 matmuls on NVIDIA GPUs (Hopper or newer); TPUs have no "
                          "fp8 matrix unit: use --set train.matmul_dtype=compute there")
    return dict(compute_dtype=compute_dtype_for(config, platform), remat=config.train.remat,
                scan_unroll=config.train.scan_unroll, pipeline=config.pipeline, matmul_dtype=config.train.matmul_dtype)


def next_token_loss(config: Config, platform: str) -> LossFn:
    """Cross entropy of each next token, run with the config's options (`model_options`); with mixtures of
    experts plus their balance losses, and the routing metrics."""
    options = model_options(config, platform)
    use_segments = config.data.document_masking

    def loss_fn(model, batch, rngs):
        tokens = batch["tokens"]
        segments = batch["segment_ids"][:, :-1] if use_segments else None
        if config.model.moe is None:  # the loss through run_layers_and_loss: 1F1B schedules take it inside
            return model.next_token_loss(tokens[:, :-1], tokens[:, 1:], segments, **options)
        logits, moe_stats = model.forward(tokens[:, :-1], segments, **options)
        return moe_objective(cross_entropy(logits, tokens[:, 1:]), moe_stats, config.model.moe)

    return loss_fn


def plain_next_token_loss(model, batch, rngs):
    """The default loss for a user's language model: `model(tokens)` -> logits, cross entropy of each next
    token."""
    tokens = batch["tokens"]
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


def lm_batch_spec(config: Config) -> dict:
    """Shapes of one global batch of the configured text data."""
    shape = (config.train.batch_size, config.model.seq_len + 1)
    return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32)}
