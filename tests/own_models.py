"""Small user models for the bring-your-own-model tests: their own logical names, nothing of jaxscale's."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

FEATURES, HIDDEN, CLASSES = 16, 32, 8
INIT = nnx.initializers.lecun_normal()
# The models' logical names -> mesh axes ("hidden" is also pinned on the activations, through Flax's own API).
RULES = ["sharding.params.features=fsdp", "sharding.params.hidden=tensor", "sharding.params.classes=null",
         "sharding.activations.hidden=tensor"]


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
        self.w_in = nnx.Linear(FEATURES, HIDDEN, kernel_init=nnx.with_partitioning(INIT, ("features", "hidden")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("hidden",)), rngs=rngs)
        self.scale = nnx.Param(jnp.ones((HIDDEN,)))  # no names: replicated, with a warning
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.w_out = nnx.Linear(HIDDEN, CLASSES, kernel_init=nnx.with_partitioning(INIT, ("hidden", "classes")),
                                rngs=rngs)

    def __call__(self, x):
        h = nn.with_logical_constraint(jnp.tanh(self.w_in(x)) * self.scale, ("batch", "hidden"))
        return self.w_out(self.dropout(h))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = nn.initializers.lecun_normal()
        h = nn.Dense(HIDDEN, kernel_init=nn.with_logical_partitioning(kernel, ("features", "hidden")))(x)
        h = nn.with_logical_constraint(jnp.tanh(h), ("batch", "hidden"))
        return nn.Dense(CLASSES, kernel_init=nn.with_logical_partitioning(kernel, ("hidden", "classes")))(h)


def classification_loss(model, batch, rngs):
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


class Blobs:
    """A random-access source: noisy clusters, one per class (the same clusters for every seed)."""

    def __init__(self, n: int = 512, seed: int = 0):
        centers = np.random.default_rng(0).normal(size=(CLASSES, FEATURES)).astype(np.float32) * 2
        rng = np.random.default_rng(seed + 1)
        self.y = rng.integers(0, CLASSES, n).astype(np.int32)
        self.x = (centers[self.y] + rng.normal(size=(n, FEATURES))).astype(np.float32)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def batches(steps: int, batch_size: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    data = Blobs(steps * batch_size, seed)
    return [{"x": data.x[s * batch_size:(s + 1) * batch_size], "y": data.y[s * batch_size:(s + 1) * batch_size]}
            for s in range(steps)]
