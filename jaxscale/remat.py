"""What the backward pass keeps from the forward pass (`train.remat`), as `jax.checkpoint` policies.

none: everything. dots: the outputs of matmuls with weights and of fused (cuDNN) attention; the elementwise
work between them (norms, GELU, bias adds) is redone in the backward pass, fused into its kernels, instead of
being written out and read back. full: only each checkpointed block's input.
"""
from __future__ import annotations

import jax


def is_fused_attention(prim) -> bool:
    """cuDNN flash attention's forward (jax.nn.dot_product_attention on GPU): its output and softmax statistics
    are what its backward needs; keeping them saves running it again."""
    return prim.name.startswith("dot_product_attention_fwd")


def weights_and_attention_saveable(prim, *_, **params) -> bool:
    """Matmuls with weights and fused attention. A weight matmul has no batch dimension, or one where a `vmap`
    (pipeline stages) adds it; attention's score matmuls (the XLA implementation) have two or more."""
    if prim is jax.lax.dot_general_p:
        return len(params["dimension_numbers"][1][0]) <= 1
    return is_fused_attention(prim)


def dots_and_attention_saveable(prim, *_, **params) -> bool:
    return prim is jax.lax.dot_general_p or is_fused_attention(prim)


POLICIES = {
    "none": None,
    "dots": weights_and_attention_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
