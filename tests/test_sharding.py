"""Parameters are really sharded as the rules declare, not silently replicated."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxscale.config import DEFAULT_PARAM_RULES, Config, MeshConfig
from jaxscale.errors import ConfigError
from jaxscale.model import ModelConfig
from jaxscale.sharding import logical_to_spec
from jaxscale.training import build_trainer


def trainer_for(mesh: dict, model="tiny"):
    config = Config(model=ModelConfig.from_preset(model, seq_len=32), mesh=MeshConfig(**{"data": 1, **mesh}))
    n = int(np.prod(list(mesh.values())))
    return build_trainer(config, jax.devices()[:n])


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = {"a": "tensor", "b": ["data", "tensor"], "c": None}
    assert logical_to_spec(("a", "b", "c"), rules) == P("tensor", "data", None)
    assert logical_to_spec(("b", "a"), rules) == P(("data", "tensor"), None)


@pytest.mark.parametrize("mesh", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(tensor=4, fsdp=2)])
def test_every_parameter_follows_its_rule(mesh):
    trainer = trainer_for(mesh)
    state = trainer.init_state()
    axes = trainer.model.logical_axes
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_params = jax.tree_util.tree_leaves_with_path(state.params)
    assert [p for p, _ in flat_axes] == [p for p, _ in flat_params]
    for (path, names), (_, array) in zip(flat_axes, flat_params):
        expected = logical_to_spec(names, DEFAULT_PARAM_RULES, trainer.mesh)
        assert array.sharding.spec == expected, jax.tree_util.keystr(path)
        # What each device really holds: the global shape divided along each sharded dimension.
        local = array.addressable_shards[0].data.shape
        for dim, (size, spec_axes) in enumerate(zip(array.shape, list(expected) + [None] * array.ndim)):
            ways = int(np.prod([trainer.mesh.shape[a] for a in ([spec_axes] if isinstance(spec_axes, str)
                                                                   else spec_axes or ())]))
            assert local[dim] == size // ways, (jax.tree_util.keystr(path), dim)


def test_fsdp8_holds_one_eighth_of_each_matrix_and_its_adam_moments():
    trainer = trainer_for(dict(fsdp=8))
    state = trainer.init_state()
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    for name in ("wqkv", "w_in", "w_out", "wo"):
        array = state.params["blocks"][name]
        assert array.addressable_shards[0].data.size * 8 == array.size, name
        assert len({s.device for s in array.addressable_shards}) == 8
        assert mu["blocks"][name].sharding == array.sharding, name
    embed = state.params["embed"]
    assert embed.addressable_shards[0].data.size * 8 == embed.size


def test_fsdp_splits_every_matrix_along_its_leading_dimension():
    # Gathering or reduce-scattering a split along the leading dimension needs no transpose (see transformer.py).
    params = trainer_for(dict(fsdp=8)).init_state().params
    for name in ("wqkv", "wo", "w_in", "w_out"):
        assert tuple(params["blocks"][name].sharding.spec)[:2] == (None, "fsdp"), name  # after `layers`
    assert params["embed"].sharding.spec == P("fsdp", None)


def test_indivisible_dimension_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cannot be split 8 ways.*sharding.params"):
        config = Config(model=ModelConfig.from_preset("tiny", d_model=36, n_heads=4, seq_len=32),
                        mesh=MeshConfig(data=1, fsdp=8))
        build_trainer(config)
