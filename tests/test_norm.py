"""The norms and their one-kernel backward pass (`jaxscale.kernels.norm`), run here by Pallas's interpreter: the
kernel's gradients equal autodiff's of the same forward (float32 inputs: within 2e-5 of the largest entry;
bfloat16: within one rounding step), for LayerNorm and RMSNorm, widths that are not powers of two and row
counts that leave a partial block. Training with it: test_kernels_in_training.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxscale.kernels import norm as norm_module
from jaxscale.kernels.norm import norm, norm_backward, norm_with_fused_backward, normalize
from jaxscale.kernels.rows import RowKernelLayout


def inputs(shape, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (2 * jax.random.normal(k[0], shape) + 0.5).astype(dtype)
    dy = jax.random.normal(k[1], shape).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(k[2], shape[-1:])
    bias = 0.1 * jax.random.normal(k[3], shape[-1:])
    return x, dy, scale, bias


def autodiff(x, dy, scale, bias):
    return jax.vjp(lambda x, s, b: normalize(x, s, b, 1e-5)[0], x, scale, bias)[1](dy)


def assert_close(got, want, rel):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=rel * float(np.abs(np.asarray(want, np.float32)).max()))


@pytest.mark.parametrize("centred", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape,programs", [((3, 37, 100), 2), ((2, 64, 768), 512)],
                         ids=["partial-blocks-several-per-program", "gpt2-width"])
def test_kernel_matches_autodiff(centred, shape, programs):
    x, dy, scale, bias = inputs(shape)
    bias = bias if centred else None
    _, mean, rstd = normalize(x, scale, bias, 1e-5)
    mean = mean if centred else jnp.zeros_like(rstd)
    dx, dscale, dbias = norm_backward(x, dy, scale, mean, rstd, centred=centred, interpret=True, programs=programs)
    want = autodiff(x, dy, scale, bias)
    assert dx.shape == x.shape and dscale.shape == dbias.shape and dscale.shape[1] == shape[-1]
    assert_close(dx, want[0], 2e-5)
    assert_close(dscale.sum(0), want[1], 2e-5)  # partial sums, one row per program
    if centred:
        assert_close(dbias.sum(0), want[2], 2e-5)


def test_custom_gradient_in_bfloat16_matches_autodiff():
    x, dy, scale, bias = inputs((4, 50, 96), jnp.bfloat16)
    one_device = RowKernelLayout(None, PartitionSpec())
    y, vjp = jax.vjp(lambda x, s, b: norm_with_fused_backward(x, s, b, 1e-5, one_device), x, scale, bias)
    assert y.dtype == jnp.bfloat16 and jnp.array_equal(y, normalize(x, scale, bias, 1e-5)[0])
    got, want = vjp(dy), autodiff(x, dy, scale, bias)
    assert_close(got[0], want[0], 1e-2)  # bfloat16 dx: rounding differs by at most one step of the largest entries
    assert_close(got[1], want[1], 1e-5)
    assert_close(got[2], want[2], 1e-5)


def test_used_on_gpus_for_rows_up_to_1024(monkeypatch):
    assert norm_module.row_kernel_layout(norm_module.ACTIVATION) is None  # the CPU
    monkeypatch.setattr(norm_module, "row_kernel_layout", lambda names: RowKernelLayout(None, PartitionSpec()))
    for width, kernel in ((1024, True), (1600, False)):
        x, _, scale, bias = inputs((2, 4, width))
        assert ("custom_vjp_call" in str(jax.make_jaxpr(lambda *a: norm(*a, 1e-5))(x, scale, bias))) == kernel
