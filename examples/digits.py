"""An image classifier of your own, trained sharded: a small MLP-Mixer in Flax NNX (or, with --linen, an MLP in
Flax Linen) on scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with scikit-learn: no download).

Its parameters name their dimensions with its own words ("patch", "channel", "hidden", "classes"), the rule
tables map those onto a data=2 x fsdp=2 x tensor=2 mesh, and jaxscale.train does the rest: sharded init,
the step, checkpoints, resume.

    python examples/digits.py                 # 8 simulated CPU devices if there are no accelerators
    python examples/digits.py --steps 50      # shorter
    python examples/digits.py --linen         # the Linen model, through the same call
"""
from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:  # 8 simulated devices on a CPU-only machine (must be set before jax starts)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import jaxscale

P = nnx.with_partitioning
INIT = nnx.initializers.lecun_normal()


class MixerBlock(nnx.Module):
    """Mix across patches, then across channels; each weight names its dimensions for the sharding rules."""

    def __init__(self, patches: int, channels: int, hidden: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(channels, rngs=rngs)
        self.token_in = nnx.Linear(patches, hidden, kernel_init=P(INIT, ("patch", "hidden")), rngs=rngs)
        self.token_out = nnx.Linear(hidden, patches, kernel_init=P(INIT, ("hidden", "patch")), rngs=rngs)
        self.norm2 = nnx.LayerNorm(channels, rngs=rngs)
        self.channel_in = nnx.Linear(channels, hidden, kernel_init=P(INIT, ("channel", "hidden")), rngs=rngs)
        self.channel_out = nnx.Linear(hidden, channels, kernel_init=P(INIT, ("hidden", "channel")), rngs=rngs)

    def __call__(self, x):  # x: (batch, patches, channels)
        y = self.norm1(x).swapaxes(1, 2)
        x = x + self.token_out(nnx.gelu(self.token_in(y))).swapaxes(1, 2)
        return x + self.channel_out(nnx.gelu(self.channel_in(self.norm2(x))))


class Mixer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, patch: int = 2, channels: int = 64, hidden: int = 128, depth: int = 2,
                 classes: int = 10, dropout: float = 0.1):
        self.patch = patch
        patches = (8 // patch) ** 2
        self.embed = nnx.Linear(patch * patch, channels, kernel_init=P(INIT, ("pixels", "channel")), rngs=rngs)
        self.blocks = nnx.List([MixerBlock(patches, channels, hidden, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(channels, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(channels, classes, kernel_init=P(INIT, ("channel", "classes")), rngs=rngs)

    def __call__(self, images):  # (batch, 8, 8) -> logits (batch, classes)
        b, p = images.shape[0], self.patch
        x = images.reshape(b, 8 // p, p, 8 // p, p).transpose(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(self.norm(x).mean(axis=1)))


class LinenMLP(nn.Module):
    """The Linen form: the same logical names, through nn.with_logical_partitioning."""

    hidden: int = 256
    classes: int = 10

    @nn.compact
    def __call__(self, images):
        kernel = nn.initializers.lecun_normal()
        x = images.reshape(images.shape[0], -1)
        x = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(kernel, ("pixels", "hidden")))(x)
        x = nn.with_logical_constraint(nn.gelu(x), ("batch", "hidden"))  # Flax's own activation constraint
        return nn.Dense(self.classes, kernel_init=nn.with_logical_partitioning(kernel, ("hidden", "classes")))(x)


def loss_fn(model, batch, rngs):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


class Digits:
    """A random-access source: example i is a dict of arrays (grain's RandomAccessDataSource protocol)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def digits_split(held_out: float = 0.2, seed: int = 0) -> tuple[Digits, Digits]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * (1 - held_out))
    return Digits(images[order[:cut]], labels[order[:cut]]), Digits(images[order[cut:]], labels[order[cut:]])


# Each model's own logical names -> mesh axes (a rule that names no parameter of the model is refused).
MIXER_RULES = ["sharding.params.channel=fsdp", "sharding.params.hidden=tensor", "sharding.params.patch=null",
               "sharding.params.pixels=null", "sharding.params.classes=null"]
MLP_RULES = ["sharding.params.pixels=fsdp", "sharding.params.hidden=tensor", "sharding.params.classes=null",
             "sharding.activations.hidden=tensor"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="axis=size,... (its product = devices)")
    parser.add_argument("--linen", action="store_true", help="train the Linen MLP instead of the NNX Mixer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config key, e.g. --set checkpoint.every_steps=10")
    args = parser.parse_args(argv)
    mesh = [f"mesh.{kv}" for kv in args.mesh.split(",")]
    config = jaxscale.load_config("default", [
        f"train.steps={args.steps}", "train.batch_size=64", "train.eval_every=100", "train.eval_batches=6",
        "train.log_every=50", "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=20",
        "checkpoint.every_steps=100", f"run_dir={args.run_dir}", *mesh, *(MLP_RULES if args.linen else MIXER_RULES), *args.overrides])
    train, held_out = digits_split()
    model = LinenMLP() if args.linen else (lambda rngs: Mixer(rngs))
    result = jaxscale.train(config, model=model, loss_fn=loss_fn, data=train, eval_data=held_out)

    # Held-out accuracy over every held-out image, with the trained parameters (dropout off).
    model = result.trained_model()
    accuracy = float((model(jnp.asarray(held_out.images)).argmax(-1) == held_out.labels).mean())
    print(f"held-out accuracy {accuracy:.1%} on {len(held_out)} images after {args.steps} steps "
          f"on {jax.device_count()} devices")
    return {"accuracy": accuracy, "result": result}


if __name__ == "__main__":
    main()
