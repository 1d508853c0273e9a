"""The device mesh: logical axes (data, pipeline, fsdp, tensor) laid over the physical devices.

Device order matters: neighbours on the innermost axes (tensor, then fsdp) should share the fastest links.
`mesh_utils` knows TPU topologies and, for several slices or hosts, keeps the `dcn_*` part of each axis across
slices so only the outer, less chatty axes cross the slow network.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxscale.config import MeshConfig, resolve_mesh_sizes


def build_mesh(mesh_config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_sizes(mesh_config, len(devices))
    names = mesh_config.names()
    shape = [sizes[a] for a in names]
    dcn = [mesh_config.dcn_sizes()[a] for a in names]
    if np.prod(dcn) > 1:
        in_slice = [s // d for s, d in zip(shape, dcn)]
        # On GPUs and CPUs each process (host) is a granule; TPU devices carry their slice index.
        by_process = not hasattr(devices[0], "slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(in_slice, dcn, devices, process_is_granule=by_process)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils cannot map: keep jax's order
            grid = np.asarray(devices).reshape(shape)
    # Auto axes: shardings are annotations that XLA propagates (GSPMD/Shardy), not part of the array types.
    # The model stays free of explicit out_sharding arguments, so one model runs under every layout.
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
