"""Context parallelism: the sequence split over the `context` axis gives what one device gives.

Tolerances as in test_equivalence (float32, only the order of sums changes): one attention call's outputs and
gradients within 1e-5 relative, or 1e-5 of the array's largest entry near zero; training within LOSS_RTOL /
PARAM_ATOL.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LOSS_RTOL, PARAM_ATOL, make_config, reference, run

from jaxscale.config import Config, MeshConfig, validate
from jaxscale.errors import ConfigError
from jaxscale.kernels.attention import reference as reference_attention
from jaxscale.mesh import build_mesh
from jaxscale.model.config import CONTEXT_ATTENTION
from jaxscale.parallel.blockwise_attention import blockwise_attention, key_block
from jaxscale.parallel.context import (
    IMPLEMENTATIONS,
    balanced_order,
    bytes_moved_per_layer,
    context_attention,
    kept_pairs_per_rank,
    tiles_per_rank,
)
from jaxscale.sharding import activation_rules


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_balanced_chunks_give_every_rank_the_same_causal_work(ranks):
    length = 64
    order = balanced_order(length, ranks)
    assert sorted(order) == list(range(length))
    pairs = kept_pairs_per_rank(order, ranks)
    assert len(set(pairs)) == 1 and sum(pairs) == length * (length + 1) // 2
    contiguous = kept_pairs_per_rank(np.arange(length), ranks)
    assert max(contiguous) > 2 * min(contiguous)  # what the pairing avoids: the last rank does most of the work


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_balanced_chunks_give_every_rank_the_same_tiles_to_compute(ranks):
    """The tiles the kernels compute rather than skip (their work): equal on every rank, for the all-gather and
    for every step of the ring (a rank with more to do in a step would hold up the next hand-over)."""
    length = 128 * ranks  # chunks of 64 tokens, one tile each
    order = balanced_order(length, ranks)
    gathered, ring = tiles_per_rank(order, ranks, "allgather"), tiles_per_rank(order, ranks, "ring")
    assert gathered.shape == (ranks, 1) and ring.shape == (ranks, ranks)
    assert len(set(gathered.ravel())) == 1 and gathered.sum() == ring.sum() == ranks * (2 * ranks + 1)
    assert all(len(set(ring[:, s])) == 1 for s in range(ranks))  # step by step
    # The chunks in their own order: the first rank computes the 3 tiles of its own span only, the last 4 more for
    # every other rank's span.
    contiguous = tiles_per_rank(np.arange(length), ranks, "ring").sum(axis=1)
    assert contiguous[-1] == 3 + 4 * (ranks - 1) and contiguous[0] == 3


def test_bytes_moved_per_layer():
    """4k tokens over 4 ranks, 2 KV heads of 64 in bfloat16: 1024 tokens per rank, 3 spans of them received."""
    per_token = 2 * 2 * 64 * 2 + 8
    assert bytes_moved_per_layer(4096, 4, 2, 64, 2, "allgather") == (3 * 1024 * per_token, 3 * 1024 * (per_token - 8))
    forward, backward = bytes_moved_per_layer(4096, 4, 2, 64, 2, "ring")
    assert forward == 3 * 1024 * per_token and backward == forward + 4 * 1024 * 2 * 2 * 64 * 4


MESHES = {"context2": dict(context=2), "context4": dict(context=4), "context8": dict(context=8),
          "data2-context2-tensor2": dict(data=2, context=2, tensor=2), "fsdp2-context4": dict(fsdp=2, context=4)}


def devices_for(mesh: dict) -> list:
    return jax.devices()[:int(np.prod(list(mesh.values())))]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", MESHES)
def test_context_attention_matches_one_device(layout, implementation):
    """Queries, keys and values in balanced order, split over the context ranks, packed documents, 2 query heads
    per KV head: the outputs and gradients of plain causal attention over the sequence in its own order."""
    b, t, heads, kv_heads, hd = 2, 32, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, heads, hd))
    k, v = (jax.random.normal(key, (b, t, kv_heads, hd)) for key in keys[1:])
    segments = jnp.asarray(1 + np.cumsum(np.random.default_rng(0).random((b, t)) < 0.1, axis=1), jnp.int32)
    mesh_config = MeshConfig(**{"data": 1, **MESHES[layout]})
    mesh = build_mesh(mesh_config, devices_for(MESHES[layout]))
    rules = Config(mesh=mesh_config).sharding.activations
    ranks = mesh_config.context
    order = balanced_order(t, ranks)
    weight = jnp.cos(jnp.arange(b * t * heads * hd, dtype=jnp.float32).reshape(b, t, heads, hd))

    def expected(q, k, v):  # the sequence in its own order, one device
        return jnp.sum(reference_attention(q, k, v, segments)[:, order] * weight)

    def split(q, k, v):
        with activation_rules(mesh, rules):
            positions = jnp.broadcast_to(jnp.asarray(order), (b, t))
            return jnp.sum(context_attention(q[:, order], k[:, order], v[:, order], positions,
                                             segments[:, order], implementation) * weight)

    want = jax.jit(jax.value_and_grad(expected, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5 * np.max(np.abs(w))), got, want)


@pytest.mark.slow
@pytest.mark.parametrize("style,layout,implementation",
                         [("gpt2", layout, "allgather") for layout in MESHES] + [("llama", "context4", "allgather")]
                         + [("llama", layout, "ring") for layout in MESHES])
def test_training_with_the_sequence_split_matches_one_device(style, layout, implementation):
    """Three AdamW steps of the tiny decoder on packed documents: losses, gradient norms and parameters. The
    ring with tiny-llama: 4 query heads on 2 KV heads."""
    mesh = MESHES[layout]
    config = make_config(style, mesh)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, context_attention=implementation))
    losses, params = run(config, devices_for(mesh))
    ref_losses, ref_params = reference(style)
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), params, ref_params)


def test_context_checks():
    config = make_config("gpt2", dict(context=8))
    validate(config, 8)
    odd = dataclasses.replace(config, model=dataclasses.replace(config.model, seq_len=24))
    with pytest.raises(ConfigError, match="model.seq_len=24 must be a multiple of 2 x mesh.context = 16"):
        validate(odd, 8)
    with pytest.raises(ConfigError, match="mesh.context > 1 with mesh.pipeline > 1"):
        validate(dataclasses.replace(config, mesh=MeshConfig(data=1, context=2, pipeline=2)), 4)
    with pytest.raises(ConfigError, match="model.context_attention='rings'; choose allgather or ring"):
        dataclasses.replace(config.model, context_attention="rings")
    assert CONTEXT_ATTENTION == IMPLEMENTATIONS


# ----------------------------------------------------------------------------------------------------------
# Attention block by block over the gathered keys


@pytest.mark.parametrize("order_kind,block,documents", [("balanced", 8, True), ("balanced", 16, False),
                                                        ("own", 8, True), ("own", 64, True)])
def test_blockwise_attention_matches_plain_attention(order_kind, block, documents):
    """Queries and keys in any order (masked by their positions), grouped KV heads, several key blocks or one;
    in the sequence's own order the causal mask skips whole blocks."""
    b, t, heads, kv_heads, hd = 2, 64, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, t, heads, hd))
    k, v = (jax.random.normal(key, (b, t, kv_heads, hd)) for key in keys[1:])
    segments = jnp.asarray(1 + np.cumsum(np.random.default_rng(1).random((b, t)) < 0.1, axis=1), jnp.int32)
    order = balanced_order(t, 2) if order_kind == "balanced" else np.arange(t)
    weight = jnp.cos(jnp.arange(b * t * heads * hd, dtype=jnp.float32).reshape(b, t, heads, hd))
    seg = segments if documents else None

    def expected(q, k, v):
        return reference_attention(q, k, v, seg)[:, order]

    def blockwise(q, k, v):
        positions = jnp.broadcast_to(jnp.asarray(order), (b, t))
        s = None if seg is None else seg[:, order]
        return blockwise_attention(q[:, order], k[:, order], v[:, order], positions, positions, s, s, block=block)

    def output_and_grads(attend):  # the output, and the gradients of a weighted sum of it
        return attend(q, k, v), jax.grad(lambda *a: jnp.sum(attend(*a) * weight), argnums=(0, 1, 2))(q, k, v)

    want = jax.jit(lambda: output_and_grads(expected))()
    got = jax.jit(lambda: output_and_grads(blockwise))()
    jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5 * np.max(np.abs(w))), got, want)


def test_key_block_divides_the_length():
    assert [key_block(n) for n in (64, 512, 4096, 1000, 48)] == [64, 512, 512, 500, 48]


def context_attention_grad_memory(length: int, ranks: int = 2, implementation: str = "allgather",
                                  kv_heads: int = 1, groups: int = 2) -> int:
    """Compiled temporary bytes per device of the gradient of context-parallel attention (batch 1, `groups` query
    heads per KV head, head_dim 16, packed documents) with the sequence over `ranks` context ranks, in a scan
    over two layers as the model runs it (where autodiff would hoist a mask that depends only on positions)."""
    mesh_config = MeshConfig(data=1, context=ranks)
    mesh = build_mesh(mesh_config, jax.devices()[:ranks])
    rules = Config(mesh=mesh_config).sharding.activations
    heads = groups * kv_heads
    x = jax.ShapeDtypeStruct((1, length, heads + 2 * kv_heads, 16), jnp.float32)
    rows = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(x, positions, segments):
        def layer(x, scale):  # queries, keys and values from the layer's input, as in the model
            q, k, v = x[:, :, :heads] * scale, x[:, :, heads:heads + kv_heads], x[:, :, heads + kv_heads:]
            y = context_attention(q, k, v, positions, segments, implementation)
            return jnp.concatenate([y, x[:, :, heads:]], axis=2), None

        with activation_rules(mesh, rules):
            return jax.lax.scan(layer, x, jnp.ones(2))[0].sum()

    return jax.jit(jax.grad(loss)).lower(x, rows, rows).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_context_attention_memory_grows_linearly_in_length(implementation):
    """At 2k, 4k and 8k tokens over 2 context ranks: at most 2.2-fold per doubling (XLA's form with its
    (own length x length) mask and scores grows 4-fold). Measured: see BENCHMARKS.md, context parallelism."""
    sizes = [context_attention_grad_memory(n, implementation=implementation) for n in (2048, 4096, 8192)]
    assert sizes[1] <= 2.2 * sizes[0] and sizes[2] <= 2.2 * sizes[1], sizes


def test_ring_attention_holds_less_than_the_gathered_keys():
    """8k tokens over 8 ranks, 8 heads with their own keys: the ring keeps one rank's keys and values, not the
    sequence's. Measured 40.8 MiB against 69.8 MiB."""
    gathered, ring = (context_attention_grad_memory(8192, 8, i, kv_heads=8, groups=1) for i in IMPLEMENTATIONS)
    assert ring < 0.75 * gathered, (ring, gathered)
