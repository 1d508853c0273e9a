"""train.remat: each policy keeps for the backward pass what it says, and nothing else."""
import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxscale.model import Model, ModelConfig
from jaxscale.model.transformer import layer
from jaxscale.remat import POLICIES, dots_and_attention_saveable, weights_and_attention_saveable


def kept_values(remat: str, capsys) -> list[str]:
    """The residuals a GPT-2 layer keeps under `remat`, other than its inputs (input and weights)."""
    cfg = ModelConfig.from_preset("tiny")
    weights = jax.tree.map(lambda a: a[0], Model.build(cfg).init(jax.random.key(0))["blocks"])
    x = jnp.ones((2, 16, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(x, weights):
        return layer(cfg, weights, x, positions, None, jnp.float32).sum()

    if POLICIES[remat] is not None:
        loss = jax.checkpoint(loss, policy=POLICIES[remat])
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
