"""Training with the GPU kernels (norm backward, cross-entropy) forced on and run by Pallas's interpreter gives the
equivalence suite's losses and parameters: on one device, on meshes that split the batch (each device runs the
kernels on its own rows under shard_map) and with tensor-parallel ranks, where cross-entropy keeps XLA's form
because the vocabulary is split. Spies record which kernels were traced, so a silent fallback fails the test."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from test_equivalence import assert_same, make_config, reference, run

from jaxscale.model import norm as norm_module
from jaxscale.sharding import activation_rules, row_layout
from jaxscale.training import loss as loss_module

MESHES = {"one-device": {}, "data2-fsdp4": dict(data=2, fsdp=4), "data4-tensor2": dict(data=4, tensor=2)}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("mesh", MESHES)
def test_training_with_the_kernels_matches_one_device_without(style, mesh, monkeypatch):
    traced = []
    for module, name in ((norm_module, "norm_backward"), (loss_module, "softmax_kernel")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, "row_kernel_layout", row_layout)  # as on a GPU
        monkeypatch.setattr(module, name, lambda *a, _name=name, _kernel=kernel, **k: traced.append(_name) or
                            _kernel(*a, **k))
    n = int(np.prod(list(MESHES[mesh].values()) or [1]))
    assert_same(run(make_config(style, MESHES[mesh]), jax.devices()[:n]), reference(style))
    vocab_split = "tensor" in MESHES[mesh]
    assert set(traced) == ({"norm_backward"} if vocab_split else {"norm_backward", "softmax_kernel"})


def test_row_layout_where_rows_are_whole():
    rules = {"batch": ["data", "fsdp"], "length": None, "embed": None, "vocab": "tensor"}

    def mesh(data=1, fsdp=1, tensor=1, pipeline=1):
        shape = (data, fsdp, tensor, pipeline)
        return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), ("data", "fsdp", "tensor", "pipeline"))

    with activation_rules(mesh(data=2, fsdp=4), rules):
        layout = row_layout(("batch", "length", "embed"))
        assert layout.spec == PartitionSpec(("data", "fsdp"), None, None)
        assert layout.rows == PartitionSpec(("data", "fsdp"), None)
        assert layout.per_device == PartitionSpec(("data", "fsdp"), None)
    with activation_rules(mesh(data=4, tensor=2), rules):
        assert row_layout(("batch", "length", "embed")).spec == PartitionSpec("data", None, None)
        assert row_layout(("batch", "length", "vocab")) is None  # the vocabulary is split
    with activation_rules(mesh(data=4, pipeline=2), rules):
        assert row_layout(("batch", "length", "embed")) is None
    with activation_rules(mesh(), rules):
        assert row_layout(("batch", "length", "vocab")).mesh is None  # one device: the kernel is called directly
