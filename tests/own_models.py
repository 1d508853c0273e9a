"""Small user models for the bring-your-own-model tests: their own logical names, nothing of jaxscale's."""
from __future__ import annotations

import jax
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


LAYERS = 4


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(HIDDEN, HIDDEN, kernel_init=nnx.with_partitioning(INIT, ("hidden_in", "hidden")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("hidden",)), rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(x))


class StackedNet(nnx.Module):
    """Its repeated blocks kept as one module stacked over a leading `layers` dimension (nnx.vmap), run by
    jaxscale.parallel.run_layers: a scan, or pipeline stages on a pipeline mesh, scheduled as `pipeline` (the
    run's config.pipeline) says."""

    def __init__(self, rngs: nnx.Rngs, pipeline=None, staged: bool = True):
        from jaxscale.parallel import run_layers

        self.run_layers, self.pipeline, self.staged = run_layers, pipeline, staged
        self.w_in = nnx.Linear(FEATURES, HIDDEN, kernel_init=nnx.with_partitioning(INIT, ("features", "hidden")),
                               use_bias=False, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def blocks(rngs):
            return Layer(rngs)

        self.blocks = blocks(rngs)
        self.w_out = nnx.Linear(HIDDEN, CLASSES, kernel_init=nnx.with_partitioning(INIT, ("hidden", "classes")),
                                use_bias=False, rngs=rngs)

    def __call__(self, x):
        graphdef, stack = nnx.split(self.blocks)
        h = self.w_in(x)
        if self.staged:
            h = self.run_layers(lambda h, layer, _: nnx.merge(graphdef, layer)(h), stack, h,
                                settings=self.pipeline)
        else:  # a loop of its own: there is nothing for the pipeline to cut
            h = jax.lax.scan(lambda h, layer: (nnx.merge(graphdef, layer)(h), None), h, stack)[0]
        return self.w_out(h)

    def loss(self, x, labels):
        """The mean cross entropy of `labels`, the blocks and the output layer run by run_layers_and_loss: a
        1F1B pipeline schedule takes each microbatch's loss inside it."""
        from jaxscale.parallel import run_layers_and_loss

        graphdef, stack = nnx.split(self.blocks)
        out_graphdef, out_weights = nnx.split(self.w_out)

        def head_loss(weights, h, labels):
            logits = nnx.merge(out_graphdef, weights)(h)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return run_layers_and_loss(lambda h, layer, _: nnx.merge(graphdef, layer)(h), stack, self.w_in(x), None,
                                   head_loss, out_weights, labels, settings=self.pipeline)


def staged_classification_loss(model, batch, rngs):
    return model.loss(batch["x"], batch["y"])
