"""GPT-2's bias + GELU and its two Pallas kernels (`jaxscale.kernels.gelu`), run here by Pallas's interpreter: the
forward kernel equals GELU of float32 inputs within float32 rounding, its gradients equal autodiff's (the bias
gradient from per-program partial sums), for widths that are not a multiple of the column block and row counts
that leave partial blocks; in bfloat16 the kernels are at least as close to float32 GELU as XLA's bfloat16
form. Training with the kernels: test_kernels_in_training.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxscale.kernels import gelu as gelu_module
from jaxscale.kernels.gelu import bias_gelu, bias_gelu_with_kernels, gelu_backward, gelu_forward, reference
from jaxscale.kernels.rows import RowKernelLayout


def inputs(shape, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    y = (2 * jax.random.normal(k[0], shape)).astype(dtype)
    b = (0.5 * jax.random.normal(k[1], shape[-1:])).astype(dtype)
    dg = jax.random.normal(k[2], shape).astype(dtype)
    return y, b, dg


def exact(y, b, dg):
    """GELU in float32 and its gradients by autodiff."""
    y, b, dg = (a.astype(jnp.float32) for a in (y, b, dg))
    out, vjp = jax.vjp(lambda y, b: jax.nn.gelu(y + b), y, b)
    return out, *vjp(dg)


def max_error(got, want):
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max())


@pytest.mark.parametrize("shape,tiling", [((3, 37, 384), (8, 256, 2, 4)), ((2, 64, 1280), None)],
                         ids=["partial-row-blocks-several-per-program", "width-not-a-multiple-of-1024"])
def test_kernels_match_autodiff_in_float32(shape, tiling):
    y, b, dg = inputs(shape)
    want_out, want_dy, want_db = exact(y, b, dg)
    out = gelu_forward(y, b, interpret=True, tiling=tiling)
    dy, db = gelu_backward(y, b, dg, interpret=True, tiling=tiling)
    assert out.shape == dy.shape == y.shape and db.shape[1] == shape[-1] and db.shape[0] > 1
    assert max_error(out, want_out) < 1e-5
    assert max_error(dy, want_dy) < 1e-5
    assert max_error(db.sum(0), want_db) < 1e-4 * float(jnp.abs(want_db).max())  # partial sums, one row per program


def test_custom_gradient_in_bfloat16_is_as_close_to_float32_as_xla():
    y, b, dg = inputs((4, 50, 256), jnp.bfloat16)
    one_device = RowKernelLayout(None, PartitionSpec())
    out, vjp = jax.vjp(lambda y, b: bias_gelu_with_kernels(y, b, one_device), y, b)
    xla_out, xla_vjp = jax.vjp(reference, y, b)
    (dy, db), (xla_dy, xla_db) = vjp(dg), xla_vjp(dg)
    assert out.dtype == dy.dtype == db.dtype == jnp.bfloat16
    want_out, want_dy, want_db = exact(y, b, dg)
    assert max_error(out, want_out) <= max_error(xla_out, want_out)
    assert max_error(dy, want_dy) <= max_error(xla_dy, want_dy)
    assert max_error(db, want_db) <= max(max_error(xla_db, want_db), 1e-2 * float(jnp.abs(want_db).max()))


def test_used_on_gpus_where_the_width_is_a_multiple_of_128(monkeypatch):
    def uses_kernels(width):  # a new function each time: make_jaxpr caches traces by function and shapes
        y, b, _ = inputs((2, 4, width))
        return "custom_vjp_call" in str(jax.make_jaxpr(lambda y, b: bias_gelu(y, b))(y, b))

    assert not uses_kernels(256)  # the CPU: XLA's form
    monkeypatch.setattr(gelu_module, "row_kernel_layout", lambda names: RowKernelLayout(None, PartitionSpec()))
    assert uses_kernels(256) and not uses_kernels(200)
