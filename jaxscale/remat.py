"""What the backward pass keeps from the forward pass (`train.remat`), as `jax.checkpoint` policies.

none: everything. dots: the outputs of matmuls with weights and of fused attention (cuDNN, the Pallas kernels);
the elementwise work between them (norms, GELU, bias adds) is redone in the backward pass, fused into its
kernels, instead of being written out and read back. full: only each checkpointed block's input.
"""
from __future__ import annotations

import jax

# The checkpoint name the Pallas attention kernels (jaxscale.kernels) give their output and log-sum-exp.
ATTENTION_RESIDUALS = "attention_residuals"
_is_named_attention = jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS)


def is_fused_attention(prim, *args, **params) -> bool:
    """A fused attention kernel's forward: cuDNN's (jax.nn.dot_product_attention on GPU, matched by its
    primitive) or a Pallas kernel's (matched by checkpoint name). Its output and softmax statistics are what
    its backward needs; keeping them saves running it again."""
    return prim.name.startswith("dot_product_attention_fwd") or _is_named_attention(prim, *args, **params)


def weights_and_attention_saveable(prim, *args, **params) -> bool:
    """Matmuls with weights and fused attention. A weight matmul has no batch dimension, or one where a `vmap`
    (pipeline stages) adds it; attention's score matmuls (the XLA implementation) have two or more."""
    if prim is jax.lax.dot_general_p:
        return len(params["dimension_numbers"][1][0]) <= 1
    return is_fused_attention(prim, *args, **params)


def dots_and_attention_saveable(prim, *args, **params) -> bool:
    return prim is jax.lax.dot_general_p or is_fused_attention(prim, *args, **params)


POLICIES = {
    "none": None,
    "dots": weights_and_attention_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
