"""The token and position lookups (`embedding_lookup`): plain indexing forward; a backward that sums rows by id
through sorting and running sums, equal to indexing's scatter-add gradient (float32: within 1e-5 of the largest
entry, against sums taken in float64), also when the batch is split over devices."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxscale.model.embedding import embedding_lookup, prefix_sums, sum_rows_by_id
from jaxscale.sharding import activation_rules


def exact_sums(ids, rows, n_ids):
    want = np.zeros((n_ids, rows.shape[-1]), np.float64)
    np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(rows, np.float64).reshape(-1, rows.shape[-1]))
    return want


def test_prefix_sums_cross_block_boundaries():
    rows = jax.random.normal(jax.random.key(0), (300, 5))  # 3 blocks, the last one partial
    want = np.concatenate([np.zeros((1, 5)), np.cumsum(np.asarray(rows, np.float64), axis=0)])
    np.testing.assert_allclose(prefix_sums(rows), want, atol=1e-5 * np.abs(want).max())


def test_sums_by_id_with_a_skewed_distribution():
    # byte-level-like text: one id a sixth of all rows, most ids never seen
    n, d, n_ids = 2000, 8, 300
    common = jax.random.bernoulli(jax.random.key(0), 1 / 6, (n,))
    ids = jnp.where(common, 32, jax.random.randint(jax.random.key(1), (n,), 0, 100))
    rows = jax.random.normal(jax.random.key(2), (n, d)).astype(jnp.bfloat16)
    got = sum_rows_by_id(ids, rows, n_ids)
    want = exact_sums(ids, rows, n_ids)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert float(jnp.abs(got[100:]).max()) == 0  # ids never used get nothing


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
    assert float(jnp.abs(got[5:]).max()) == 0


def test_gradient_with_the_batch_split_over_devices_sums_every_group():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    table = jax.random.normal(jax.random.key(0), (64, 16))
    ids = jax.random.randint(jax.random.key(1), (8, 32), 0, 64)
    cotangent = jax.random.normal(jax.random.key(2), (8, 32, 16))

    def grad_under_rules(t):
        with activation_rules(mesh, {"batch": "data", "vocab": "tensor"}):
            return jax.grad(lambda t: jnp.sum(embedding_lookup(t, ids) * cotangent))(t)

    got = jax.jit(grad_under_rules)(table)
    np.testing.assert_allclose(got, exact_sums(ids, cotangent, 64), atol=1e-5 * float(jnp.abs(got).max()))
