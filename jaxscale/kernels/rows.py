"""Where a kernel that works row by row runs: on each device's own rows under shard_map, or on the one device."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxscale.kernels.platform import kernel_platform
from jaxscale.sharding import current_activation_rules, logical_to_spec, rule_axes


@dataclasses.dataclass(frozen=True)
class RowKernelLayout:
    """Where a kernel that works row by row (a Pallas call: one opaque program that XLA cannot split) runs: on
    each device's own rows of an activation laid out as `spec` over `mesh` (shard_map), or, with no mesh, on the
    one device there is. `spec` never splits the last dimension, the one the kernel walks along."""
    mesh: Mesh | None
    spec: PartitionSpec

    @property
    def rows(self) -> PartitionSpec:
        """The spec of one value per row (the activation without its last dimension)."""
        return PartitionSpec(*self.spec[:-1])

    @property
    def per_device(self) -> PartitionSpec:
        """The spec of per-device partial results (e.g. column sums, one row per program), each device's
        concatenated along the first dimension for the caller to sum."""
        axes = tuple(axis for entry in self.spec for axis in rule_axes(entry))
        return PartitionSpec(axes or None, None)

    def apply(self, kernel, in_specs, out_specs):
        """`kernel` (a function taking `interpret=`) run here: natively on GPUs, by Pallas's interpreter
        elsewhere (tests force the kernels on there)."""
        kernel = functools.partial(kernel, interpret=kernel_platform() != "gpu")
        if self.mesh is None:
            return kernel
        return jax.shard_map(kernel, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def row_kernel_layout(names: Sequence[str | None]) -> RowKernelLayout | None:
    """The layout a row-by-row GPU kernel (Pallas on Triton) runs in for an activation with these logical
    names; None when compiling for another platform (the XLA reference runs there) and where `row_layout`
    finds none."""
    return row_layout(names) if kernel_platform() == "gpu" else None


def row_layout(names: Sequence[str | None]) -> RowKernelLayout | None:
    """`row_kernel_layout` on any backend (Pallas's interpreter runs the kernels on CPUs, in tests). None where
    the last dimension is split (e.g. the vocabulary over `tensor`), under pipeline stages (the layers run
    inside the pipeline's own schedule), or with several devices outside a traced mesh."""
    context = current_activation_rules()
    if context is None:
        return RowKernelLayout(None, PartitionSpec()) if jax.device_count() == 1 else None
    mesh, rules = context
    spec = logical_to_spec(names, rules, mesh)
    if spec[-1] is not None or dict(mesh.shape).get("pipeline", 1) > 1:
        return None
    return RowKernelLayout(mesh if mesh.size > 1 else None, spec)
