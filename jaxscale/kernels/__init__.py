"""Every Pallas kernel, each beside its XLA reference, behind one dispatch per op that picks by platform
(`platform.kernel_platform`), layout (`rows.row_kernel_layout`) and shape:

    attention.attention          flash_gpu (Triton), splash_tpu, cuDNN or XLA
    norm.norm                    norm_gpu: the LayerNorm / RMSNorm backward pass
    gelu.bias_gelu               gelu_gpu: GPT-2's bias + GELU, forward and backward
    cross_entropy.cross_entropy  cross_entropy_gpu: loss and gradient in one pass over the logits
"""
from jaxscale.kernels.attention import IMPLEMENTATIONS, attention, traced_kernels

__all__ = ["IMPLEMENTATIONS", "attention", "traced_kernels"]
