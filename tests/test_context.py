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
from jaxscale.parallel.context import balanced_order, context_attention, kept_pairs_per_rank
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


MESHES = {"context2": dict(context=2), "context4": dict(context=4), "context8": dict(context=8),
          "data2-context2-tensor2": dict(data=2, context=2, tensor=2)}


def devices_for(mesh: dict) -> list:
    return jax.devices()[:int(np.prod(list(mesh.values())))]


@pytest.mark.parametrize("layout", MESHES)
def test_context_attention_matches_one_device(layout):
    """Queries, keys and values in balanced order, split over the context ranks, packed documents: the outputs
    and gradients of plain causal attention over the sequence in its own order."""
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
                                             segments[:, order]) * weight)

    want = jax.jit(jax.value_and_grad(expected, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5 * np.max(np.abs(w))), got, want)


@pytest.mark.slow
@pytest.mark.parametrize("style,layout", [("gpt2", layout) for layout in MESHES] + [("llama", "context4")])
def test_training_with_the_sequence_split_matches_one_device(style, layout):
    """Three AdamW steps of the tiny decoder on packed documents: losses, gradient norms and parameters."""
    mesh = MESHES[layout]
    losses, params = run(make_config(style, mesh), devices_for(mesh))
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
