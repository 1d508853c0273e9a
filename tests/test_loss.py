"""The cross-entropy equals logsumexp minus the target logit, value and gradient: the XLA form for bf16 logits far
from zero (where a normalizer without the max shift would overflow) and for logits split over devices along the
vocabulary; the GPU's Pallas kernel (run here by Pallas's interpreter) for vocabularies and row counts that
leave partial blocks. Training with it: test_kernels_in_training.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.kernels.cross_entropy import (
    cross_entropy,
    fused_cross_entropy,
    kernel_cross_entropy,
    softmax_kernel,
)
from jaxscale.kernels.rows import RowKernelLayout


def plain_cross_entropy(logits, targets):
    x = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets[..., None], -1)[..., 0])


def sample(shift=0.0, shape=(4, 8), vocab=96):
    logits = (shift + 4 * jax.random.normal(jax.random.key(0), (*shape, vocab))).astype(jnp.bfloat16)
    return logits, jax.random.randint(jax.random.key(1), shape, 0, vocab)


def assert_matches_plain(loss_fn, logits, targets):
    loss, grad = jax.value_and_grad(loss_fn)(logits, targets)
    want_loss, want_grad = jax.value_and_grad(plain_cross_entropy)(logits, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert grad.dtype == jnp.bfloat16
    # both round the same float32 values to bf16; allow one bf16 step of the largest entry
    np.testing.assert_allclose(grad.astype(jnp.float32), want_grad.astype(jnp.float32),
                               atol=float(jnp.abs(want_grad.astype(jnp.float32)).max()) / 128)


@pytest.mark.parametrize("shift", [0.0, 500.0, -500.0])
def test_value_and_gradient_match_the_plain_formula(shift):
    assert_matches_plain(fused_cross_entropy, *sample(shift))


@pytest.mark.parametrize("shift", [0.0, 500.0])
def test_kernel_matches_the_plain_formula_and_the_xla_form(shift):
    logits, targets = sample(shift, (3, 7), 1000)  # 21 rows, 1000 columns: partial blocks both ways below
    one_device = RowKernelLayout(None, PartitionSpec())
    kernel = lambda logits, targets: kernel_cross_entropy(logits, targets, None, one_device)  # noqa: E731
    assert_matches_plain(kernel, logits, targets)
    np.testing.assert_array_equal(kernel(logits, targets), fused_cross_entropy(logits, targets))  # no gradient
    want = jax.grad(fused_cross_entropy)(logits, targets)
    for rows_per_block, block_width in [(1, 2048), (4, 128), (8, 256)]:
        losses, grad = softmax_kernel(logits, targets, gradient=True, interpret=True, rows_per_block=rows_per_block,
                                      block_width=block_width)
        assert losses.shape == targets.shape
        np.testing.assert_allclose(losses.mean(), plain_cross_entropy(logits, targets), rtol=1e-6)
        np.testing.assert_array_equal(grad, want)  # same float32 values, rounded once to bf16


def test_vocabulary_split_over_devices_gives_the_same_loss_and_gradient():
    logits, targets = sample()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    split_logits = jax.device_put(logits, NamedSharding(mesh, PartitionSpec("data", None, "tensor")))
    split_targets = jax.device_put(targets, NamedSharding(mesh, PartitionSpec("data", None)))
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy))(split_logits, split_targets)
    want_loss, want_grad = jax.value_and_grad(cross_entropy)(logits, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_array_equal(grad, want_grad)


def test_weighted_mean_matches_the_plain_formula_in_both_forms():
    """A loss mask: sum(w * loss) / sum(w), value and gradient, by the XLA form and by the kernel."""
    logits, targets = sample(0.0, (3, 7), 200)
    weights = (jax.random.uniform(jax.random.key(2), targets.shape) < 0.5).astype(jnp.float32)

    def plain(logits, targets):
        x = logits.astype(jnp.float32)
        losses = jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
        return jnp.sum(losses * weights) / jnp.sum(weights)

    want_loss, want_grad = jax.value_and_grad(plain)(logits, targets)
    one_device = RowKernelLayout(None, PartitionSpec())
    for loss_fn in (lambda x, t: fused_cross_entropy(x, t, weights),
                    lambda x, t: kernel_cross_entropy(x, t, weights, one_device)):
        loss, grad = jax.value_and_grad(loss_fn)(logits, targets)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(grad.astype(jnp.float32), want_grad.astype(jnp.float32),
                                   atol=float(jnp.abs(want_grad.astype(jnp.float32)).max()) / 128)
        assert not np.asarray(grad.astype(jnp.float32))[np.asarray(weights) == 0].any()  # masked rows: no gradient
