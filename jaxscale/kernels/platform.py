"""Which platform the code being traced runs on, the first thing every kernel dispatch asks."""
from __future__ import annotations

import jax

from jaxscale.platforms import devices_platform
from jaxscale.sharding import current_activation_rules


def kernel_platform() -> str:
    """The platform the code being traced will run on: that of the traced mesh's devices (a TPU topology
    compiled on a CPU host is "tpu"), else JAX's default backend (a plain single-device call)."""
    context = current_activation_rules()
    return devices_platform(context[0].devices) if context is not None else jax.default_backend()
