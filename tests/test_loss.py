"""The one-pass cross-entropy equals logsumexp minus the target logit, value and gradient, for bf16 logits far
from zero (where a normalizer without the max shift would overflow) and for logits split over devices along the
vocabulary."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.training.loss import cross_entropy


def plain_cross_entropy(logits, targets):
    x = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets[..., None], -1)[..., 0])


def sample(shift=0.0):
    logits = (shift + 4 * jax.random.normal(jax.random.key(0), (4, 8, 96))).astype(jnp.bfloat16)
    return logits, jax.random.randint(jax.random.key(1), (4, 8), 0, 96)


def test_value_and_gradient_match_the_plain_formula():
    for shift in (0.0, 500.0, -500.0):
        logits, targets = sample(shift)
        loss, grad = jax.value_and_grad(cross_entropy)(logits, targets)
        want_loss, want_grad = jax.value_and_grad(plain_cross_entropy)(logits, targets)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert grad.dtype == jnp.bfloat16
        # both round the same float32 values to bf16; allow one bf16 step of the largest entry
        np.testing.assert_allclose(grad.astype(jnp.float32), want_grad.astype(jnp.float32),
                                   atol=float(jnp.abs(want_grad.astype(jnp.float32)).max()) / 128)


def test_vocabulary_split_over_devices_gives_the_same_loss_and_gradient():
    logits, targets = sample()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    split_logits = jax.device_put(logits, NamedSharding(mesh, PartitionSpec("data", None, "tensor")))
    split_targets = jax.device_put(targets, NamedSharding(mesh, PartitionSpec("data", None)))
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy))(split_logits, split_targets)
    want_loss, want_grad = jax.value_and_grad(cross_entropy)(logits, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_array_equal(grad, want_grad)
