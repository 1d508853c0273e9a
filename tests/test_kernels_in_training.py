"""Training with the GPU kernels (norm backward, cross-entropy, GPT-2's bias + GELU) forced on and run by Pallas's
interpreter gives the equivalence suite's losses and parameters: on one device, on meshes that split the batch
(each device runs the kernels on its own rows under shard_map) and with tensor-parallel ranks, where
cross-entropy and GELU keep XLA's forms because the vocabulary and the MLP dimension are split. Spies record
which kernels were traced, so a silent fallback fails the test."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same, make_config, reference, run
from jax.sharding import Mesh, PartitionSpec

from jaxscale.kernels import cross_entropy as loss_module
from jaxscale.kernels import gelu as gelu_module
from jaxscale.kernels import norm as norm_module
from jaxscale.kernels.rows import row_layout
from jaxscale.sharding import activation_rules

MESHES = {"one-device": {}, "data2-fsdp4": dict(data=2, fsdp=4), "data4-tensor2": dict(data=4, tensor=2)}
KERNELS = ((norm_module, "norm_backward"), (loss_module, "softmax_kernel"), (gelu_module, "gelu_forward"),
           (gelu_module, "gelu_backward"))


def kernels_forced_on(monkeypatch) -> list[str]:
    """Make the modules pick their kernels as on a GPU; returns the list the traced kernels' names go to."""
    traced = []
    for module, name in KERNELS:
        kernel = getattr(module, name)
        monkeypatch.setattr(module, "row_kernel_layout", row_layout)
        monkeypatch.setattr(module, name, lambda *a, _name=name, _kernel=kernel, **k: traced.append(_name) or
                            _kernel(*a, **k))
    return traced


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", MESHES)
def test_training_with_the_kernels_matches_one_device_without(style, layout, monkeypatch):
    expected = reference(style)  # before the kernels are forced on: XLA's forms
    traced = kernels_forced_on(monkeypatch)
    n = int(np.prod(list(MESHES[layout].values()) or [1]))
    assert_same(run(make_config(style, MESHES[layout]), jax.devices()[:n]), expected)
    expected_kernels = {"norm_backward"}
    if "tensor" not in MESHES[layout]:  # the vocabulary and the MLP dimension are whole on each device
        expected_kernels |= {"softmax_kernel"} | ({"gelu_forward", "gelu_backward"} if style == "gpt2" else set())
    assert set(traced) == expected_kernels


@pytest.mark.slow
def test_kernels_under_full_remat_and_gradient_accumulation(monkeypatch):
    expected = reference("gpt2")
    traced = kernels_forced_on(monkeypatch)
    config = make_config("gpt2", dict(data=2, fsdp=4), microbatches=2)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, remat="full"))
    assert_same(run(config, jax.devices()[:8]), expected)
    assert set(traced) == {"norm_backward", "softmax_kernel", "gelu_forward", "gelu_backward"}


RULES = {"batch": ["data", "fsdp"], "length": None, "embed": None, "vocab": "tensor"}


def mesh(data=1, fsdp=1, tensor=1, pipeline=1):
    shape = (data, fsdp, tensor, pipeline)
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), ("data", "fsdp", "tensor", "pipeline"))


def test_row_layout_where_rows_are_whole():
    with activation_rules(mesh(data=2, fsdp=4), RULES):
        layout = row_layout(("batch", "length", "embed"))
        assert layout.spec == PartitionSpec(("data", "fsdp"), None, None)
        assert layout.rows == PartitionSpec(("data", "fsdp"), None)
        assert layout.per_device == PartitionSpec(("data", "fsdp"), None)
    with activation_rules(mesh(data=4, tensor=2), RULES):
        assert row_layout(("batch", "length", "embed")).spec == PartitionSpec("data", None, None)
        assert row_layout(("batch", "length", "vocab")) is None  # the vocabulary is split
    with activation_rules(mesh(data=4, pipeline=2), RULES):
        assert row_layout(("batch", "length", "embed")) is None
    with activation_rules(mesh(), RULES):
        assert row_layout(("batch", "length", "vocab")).mesh is None  # one device: the kernel is called directly


def test_cross_entropy_kernel_without_gradient_on_a_mesh():
    # evaluation: the kernel's loss-only form, each device on its own rows
    logits = (4 * jax.random.normal(jax.random.key(0), (8, 5, 300))).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(1), (8, 5), 0, 300)

    def loss(logits, targets):
        with activation_rules(mesh(data=8), RULES):
            return loss_module.kernel_cross_entropy(logits, targets, None, row_layout(loss_module.LOGITS))

    np.testing.assert_allclose(jax.jit(loss)(logits, targets), loss_module.fused_cross_entropy(logits, targets),
                               rtol=1e-6)
