"""A decoder language model of your own next to the built-in one, on the built-in corpus (no download).

The model is written the way nanoGPT writes it: token and position embeddings, pre-norm blocks of causal
self-attention and an MLP, a tied output head. Its dimensions have its own logical names; the default loss
(next-token cross entropy of `model(tokens)`) and the configured text data are used as they are.

    python examples/own_decoder.py --steps 200
"""
from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:  # 8 simulated devices on a CPU-only machine (must be set before jax starts)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from flax import nnx

import jaxscale

P = nnx.with_partitioning
INIT = nnx.initializers.normal(0.02)


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=P(INIT, ("width", "qkv")), rngs=rngs)
        self.proj = nnx.Linear(width, width, kernel_init=P(INIT, ("qkv", "width")), rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, kernel_init=P(INIT, ("width", "ffn")), rngs=rngs)
        self.down = nnx.Linear(4 * width, width, kernel_init=P(INIT, ("ffn", "width")), rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        x = x + self.proj(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = 257, length: int = 256, width: int = 128, depth: int = 4,
                 heads: int = 4):
        self.tokens = nnx.Embed(vocab, width, embedding_init=P(INIT, ("words", "width")), rngs=rngs)
        self.positions = nnx.Embed(length, width, embedding_init=P(INIT, (None, "width")), rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, tokens):  # (batch, length) -> logits (batch, length, vocab)
        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.tokens.attend(self.norm(x))


RULES = ["sharding.params.width=fsdp", "sharding.params.qkv=tensor", "sharding.params.ffn=tensor",
         "sharding.params.words=null"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run-dir", default="runs/own-decoder")
    parser.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="axis=size,... (its product = devices)")
    args = parser.parse_args(argv)
    common = [f"train.steps={args.steps}", "train.eval_every=0", "train.log_every=50", "train.batch_size=16",
              "data.document_masking=false", *(f"mesh.{kv}" for kv in args.mesh.split(","))]
    results = {}
    for name, model, extra in (("yours", lambda rngs: Decoder(rngs), RULES), ("built-in", None, [])):
        config = jaxscale.load_config("default", [*common, *extra, f"run_dir={args.run_dir}/{name}"])
        result = jaxscale.train(config, model=model)
        losses = [row["loss"] for row in result.metrics if "loss" in row]
        results[name] = losses
        print(f"{name:>8} decoder: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")
    return results


if __name__ == "__main__":
    main()
