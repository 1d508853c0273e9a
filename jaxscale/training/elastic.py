"""Elastic restarts: continue a run on a different number of devices with the same global batch.

The mesh is refit to the devices present (model-parallel axes keep their size where it divides the new
count, the batch axes take what is left), and gradient accumulation makes up for lost devices: the
survivors run more microbatches, each of the per-device size the checkpoint was trained with, so the
update is the same sum over the same global batch and the loss curve continues.
"""
from __future__ import annotations

import dataclasses
import math

from jaxscale.config import Config, ConfigError, MeshConfig, resolve_mesh_sizes
from jaxscale.config import batch_shards as shards_of


def fit_mesh(mesh: MeshConfig, n_devices: int) -> MeshConfig:
    """`mesh` if it fits `n_devices`; otherwise explicit sizes that do. From the innermost axis out, each
    fixed axis keeps the part of its size that divides the devices left; the fill axis (-1, else data)
    takes the rest."""
    try:
        resolve_mesh_sizes(mesh, n_devices)
        return mesh
    except ConfigError:
        pass
    sizes = mesh.sizes()
    fill = next((axis for axis, size in sizes.items() if size == -1), "data")
    remaining, fitted = n_devices, {}
    for axis in reversed(mesh.names()):
        if axis != fill:
            fitted[axis] = math.gcd(max(sizes[axis], 1), remaining)
            remaining //= fitted[axis]
    fitted[fill] = remaining
    dcn = {f"dcn_{axis}": math.gcd(size, fitted[axis]) for axis, size in mesh.dcn_sizes().items()
           if axis not in mesh.axes}
    return MeshConfig(**{a: fitted[a] for a in fitted if a not in mesh.axes}, **dcn,
                      axes={a: fitted[a] for a in mesh.axes})


def per_device_batch(config: Config, mesh_sizes: dict[str, int]) -> int:
    return config.train.batch_size // (shards_of(mesh_sizes) * config.train.microbatches)


def microbatches_for(batch_size: int, batch_shards: int, target_per_device: int) -> int:
    """The fewest microbatches that split the global batch evenly over the batch shards with at most
    `target_per_device` sequences per device."""
    for count in range(1, batch_size + 1):
        rows, remainder = divmod(batch_size, batch_shards * count)
        if remainder == 0 and rows <= target_per_device:
            return count
    raise ConfigError(f"train.elastic: a global batch of {batch_size} cannot be split evenly over "
                      f"{batch_shards} batch shards (mesh.data x mesh.fsdp x mesh.expert) with at most "
                      f"{target_per_device} sequences per device; choose a device count whose batch shards divide {batch_size}")


def adapt_to_devices(config: Config, n_devices: int,
                     target_per_device: int | None) -> tuple[Config, str | None]:
    """(config for `n_devices`, a note saying what changed, or None). `target_per_device`: the per-device
    batch of the checkpoint being resumed; without one (a fresh start) the microbatches stay as configured."""
    mesh = fit_mesh(config.mesh, n_devices)
    sizes = resolve_mesh_sizes(mesh, n_devices)
    microbatches = config.train.microbatches
    if target_per_device is not None:
        microbatches = microbatches_for(config.train.batch_size, shards_of(sizes), target_per_device)
    if mesh == config.mesh and microbatches == config.train.microbatches:
        return config, None
    adapted = dataclasses.replace(config, mesh=mesh,
                                  train=dataclasses.replace(config.train, microbatches=microbatches))
    rows = per_device_batch(adapted, sizes)
    note = (f"elastic: {n_devices} devices -> mesh {' x '.join(f'{a}={size}' for a, size in sizes.items())}, "
            f"train.microbatches {config.train.microbatches} -> {microbatches} ({rows} sequences per device "
            f"per microbatch; global batch {config.train.batch_size} unchanged)")
    return adapted, note
