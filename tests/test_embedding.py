"""The token and position lookups (`embedding_lookup`): plain indexing forward, a one-hot matmul backward that
equals indexing's scatter-add gradient (float32, within 1e-6 of the largest entry; exact sums of a few terms)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.model.transformer import embedding_lookup


def test_lookup_and_its_gradient_match_indexing_with_repeated_ids():
    table = jax.random.normal(jax.random.key(0), (40, 16))
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 5)  # few distinct ids: many repeats
    cotangent = jax.random.normal(jax.random.key(2), (4, 8, 16))

    def weighted(lookup):
        return lambda t: jnp.sum(lookup(t) * cotangent)

    np.testing.assert_array_equal(embedding_lookup(table, ids), table[ids])
    got = jax.grad(weighted(lambda t: embedding_lookup(t, ids)))(table)
    want = jax.grad(weighted(lambda t: t[ids]))(table)
    np.testing.assert_allclose(got, want, atol=1e-6 * float(jnp.abs(want).max()))
    assert float(jnp.abs(got[5:]).max()) == 0  # ids never used get no gradient
