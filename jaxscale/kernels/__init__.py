"""Kernels with one dispatch each, chosen by platform and inputs (see `jaxscale.kernels.attention`)."""
from jaxscale.kernels.attention import IMPLEMENTATIONS, attention, traced_kernels

__all__ = ["IMPLEMENTATIONS", "attention", "traced_kernels"]
