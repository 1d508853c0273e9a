"""What the backward pass keeps from the forward pass (`train.remat`), as `jax.checkpoint` policies.

none: everything. dots: the outputs of matmuls with weights and of fused attention (cuDNN, the Pallas kernels);
the elementwise work between them (norms, GELU, bias adds) is redone in the backward pass, fused into its
kernels, instead of being written out and read back. full: only each checkpointed block's input.
save:NAMES: only the values the model tagged with these checkpoint names (the built-in decoder tags `qkv`,
`attention_out` and `mlp_hidden`), e.g. `save:qkv,attention_out`. offload:NAMES: the same values, moved to host
memory (`pinned_host`) after the forward pass and back for the backward pass; the device keeps block inputs only.
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
# The checkpoint names the built-in decoder gives its activations (jax.ad_checkpoint.checkpoint_name).
SAVE_POINTS = ("qkv", "attention_out", "mlp_hidden")
NAMED_MODES = ("save", "offload")


def parse_remat(value: str) -> tuple[str, tuple[str, ...]]:
    """'save:qkv,mlp_hidden' -> ('save', ('qkv', 'mlp_hidden')); 'dots' -> ('dots', ()). Raises ValueError with
    what is wrong."""
    mode, sep, names = value.partition(":")
    if not sep:
        if value not in POLICIES:
            raise ValueError(f"choose none, dots, full, save:NAMES or offload:NAMES (NAMES from "
                             f"{', '.join(SAVE_POINTS)}, comma-separated)")
        return value, ()
    chosen = tuple(n.strip() for n in names.split(",") if n.strip())
    if mode not in NAMED_MODES or not chosen or not set(chosen) <= set(SAVE_POINTS):
        raise ValueError(f"a named policy is save:NAMES or offload:NAMES with NAMES from {', '.join(SAVE_POINTS)}"
                         f", e.g. save:qkv,attention_out")
    return mode, chosen


def remat_policy(value: str):
    """The jax.checkpoint policy of a train.remat value (None: keep everything, no checkpoint)."""
    mode, names = parse_remat(value)
    if mode == "save":
        return jax.checkpoint_policies.save_only_these_names(*names)
    if mode == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(names), offload_src="device",
            offload_dst="pinned_host")
    return POLICIES[mode]
