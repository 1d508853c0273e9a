"""train.remat: each policy keeps for the backward pass what it says, and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxscale.model import Model, ModelConfig
from jaxscale.model.transformer import layer
from jaxscale.remat import dots_and_attention_saveable, remat_policy, weights_and_attention_saveable

POLICY_VALUES = ["dots", "full", "save:qkv,attention_out,mlp_hidden", "save:attention_out",
                 "offload:qkv,attention_out,mlp_hidden"]


def kept_values(remat: str, capsys) -> list[str]:
    """The residuals a GPT-2 layer keeps under `remat`, other than its inputs (input and weights)."""
    cfg = ModelConfig.from_preset("tiny")
    weights = jax.tree.map(lambda a: a[0], Model.build(cfg).init(jax.random.key(0))["blocks"])
    x = jnp.ones((2, 16, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(x, weights):
        return layer(cfg, weights, x, positions, None, jnp.float32).sum()

    if remat_policy(remat) is not None:
        loss = jax.checkpoint(loss, policy=remat_policy(remat))
    capsys.readouterr()
    print_saved_residuals(loss, x, weights)
    return [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]


def test_dots_keeps_the_weight_matmul_outputs_only(capsys):
    kept = kept_values("dots", capsys)
    # q/k/v projection, attention output projection, MLP input (its output projection's is not needed); the
    # MLP input matmul's output reaches the backward pass through the GELU's own checkpoint, as its input
    cfg = ModelConfig.from_preset("tiny")
    assert len(kept) == 3, kept
    assert "output of dot_general" in kept[0] and "output of dot_general" in kept[1], kept
    assert f"f32[2,16,{cfg.d_ff}] output of remat" in kept[2], kept


def test_full_keeps_the_inputs_only_and_none_keeps_more_than_dots(capsys):
    assert kept_values("full", capsys) == []
    assert len(kept_values("none", capsys)) > 3


def test_cudnn_attention_forward_counts_as_saveable():
    """By the primitive jax.nn.dot_product_attention binds on GPU (its name is what the policies match)."""
    fused_attention = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    forward = fused_attention._dot_product_attention_fwd_p_wrapper
    assert weights_and_attention_saveable(forward) and dots_and_attention_saveable(forward)
    assert not weights_and_attention_saveable(jax.lax.exp_p)


def test_named_save_points_keep_exactly_those_values(capsys):
    cfg = ModelConfig.from_preset("tiny")
    q_k_v = f"f32[2,16,{cfg.n_kv_heads},{cfg.n_heads // cfg.n_kv_heads + 2},{cfg.head_dim}]"
    heads = f"f32[2,16,{cfg.n_heads},{cfg.head_dim}]"
    hidden = f"f32[2,16,{cfg.d_ff}]"
    kept = kept_values("save:qkv,attention_out,mlp_hidden", capsys)
    assert [line.split(" ")[0] for line in kept] == [q_k_v, heads, hidden], kept
    kept = kept_values("save:attention_out", capsys)
    assert [line.split(" ")[0] for line in kept] == [heads], kept
    # offload: the same values, moved to host memory (printed as f32<host>[...])
    kept = kept_values("offload:qkv,mlp_hidden", capsys)
    assert [line.split(" ")[0] for line in kept] == [q_k_v.replace("f32", "f32<host>"),
                                                     hidden.replace("f32", "f32<host>")], kept


@pytest.mark.parametrize("value", ["some", "save:,", "keep:qkv", "save:qkv,attn"])
def test_unknown_policies_are_refused_with_the_choices(value):
    from jaxscale.config import load_config
    from jaxscale.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.remat=.*(choose none, dots, full|qkv, attention_out)"):
        load_config("default", [f"train.remat={value}"])


@pytest.mark.parametrize("style", [pytest.param("tiny", marks=pytest.mark.slow), "tiny-llama"])
def test_every_policy_gives_a_layers_gradients_of_none(style):
    cfg = ModelConfig.from_preset(style)
    weights = jax.tree.map(lambda a: a[0], Model.build(cfg).init(jax.random.key(0))["blocks"])
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(x, weights):
        return jnp.sum(jnp.sin(layer(cfg, weights, x, positions, None, jnp.float32)))

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, weights)
    for remat in POLICY_VALUES:
        got = jax.jit(jax.value_and_grad(jax.checkpoint(loss, policy=remat_policy(remat)), argnums=(0, 1)))(
            x, weights)
        jax.tree.map(lambda a, b, remat=remat: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                                                          err_msg=remat), got, want)


def loss_grads_and_temp_bytes(style: str, remat: str):
    """The built-in decoder's loss and gradients on one batch, as the train step computes them, and the
    temporary bytes of that compiled program (one CPU device)."""
    import dataclasses

    from helpers import batches, make_config

    from jaxscale.training import build_trainer
    from jaxscale.training.memory_check import step_memory
    from jaxscale.training.step import tracing_model

    config = make_config(style, {})
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, seq_len=128),
                                 train=dataclasses.replace(config.train, remat=remat, batch_size=8))
    trainer = build_trainer(config, jax.devices()[:1])
    batch = jax.device_put(batches(config)[0], trainer.data_sharding)

    def grads(params, batch):
        with tracing_model(config, trainer.mesh, trainer.plan.per_device_batch):
            return jax.value_and_grad(lambda p: trainer.model.loss(p, batch, jax.random.key(0))[0])(params)

    params = trainer.init_state().params
    compiled = jax.jit(grads).lower(params, batch).compile()
    return jax.device_get(compiled(params, batch)), step_memory(compiled).temp_bytes


@pytest.mark.slow  # about 2 minutes a style on the 2-core CPU machine
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_every_policy_gives_the_loss_and_gradients_of_none(style):
    (loss, grads), temp_none = loss_grads_and_temp_bytes(style, "none")
    temps = {"none": temp_none}
    for remat in POLICY_VALUES:
        (got_loss, got_grads), temps[remat] = loss_grads_and_temp_bytes(style, remat)
        np.testing.assert_allclose(got_loss, loss, rtol=1e-6, err_msg=remat)
        jax.tree.map(lambda a, b, remat=remat: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=remat),
                     got_grads, grads)
    # recomputing more keeps less: full < the named save points < none (XLA's temporaries, CPU)
    assert temps["full"] < temps["save:qkv,attention_out,mlp_hidden"] < temps["none"], temps
    assert temps["save:attention_out"] <= temps["save:qkv,attention_out,mlp_hidden"], temps
