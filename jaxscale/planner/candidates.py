"""The layouts a planner compares: mesh factorizations x remat policies x microbatches x host offload (optimizer
state, and with it the master parameters), each checked against the config like a run would be (`validate`), and written as the `--set` flags that give it."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from jaxscale.config import Config, MeshConfig, validate
from jaxscale.errors import ConfigError
from jaxscale.remat import SAVE_POINTS

ALL_NAMES = ",".join(SAVE_POINTS)
# From most to least kept; dots is left out: its memory is that of none in the analytic estimate.
REMAT_CHOICES = ("none", f"save:{ALL_NAMES}", "save:attention_out", "full", f"offload:{ALL_NAMES}")
MICROBATCH_CHOICES = (1, 2, 4, 8, 16)
PIPELINE_CHOICES = (1, 2, 4)
# (train.offload_optimizer, train.offload_params): the master parameters go to the host only after the moments,
# which free twice their bytes for a similar transfer
OFFLOAD_CHOICES = ((False, False), (True, False), (True, True))


@dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    pipeline: int
    microbatches: int  # train.microbatches (gradient accumulation)
    remat: str
    offload_optimizer: bool
    pipeline_microbatches: int = 0  # pipeline.microbatches when pipeline > 1
    offload_params: bool = False  # train.offload_params: the float32 master parameters in host memory

    @property
    def host_offload(self) -> bool:
        """Whether anything lives in host memory: optimizer state, master parameters or remat's activations."""
        return self.offload_optimizer or self.offload_params or self.remat.startswith("offload:")

    def overrides(self) -> list[str]:
        """The `--set` values that give this layout."""
        sets = [f"mesh.data={self.data}", f"mesh.fsdp={self.fsdp}", f"mesh.tensor={self.tensor}",
                f"mesh.pipeline={self.pipeline}", f"train.microbatches={self.microbatches}",
                f"train.remat={self.remat}", f"train.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"train.offload_params={str(self.offload_params).lower()}"]
        if self.pipeline > 1:
            sets.append(f"pipeline.microbatches={self.pipeline_microbatches}")
        return sets

    def flags(self, relative_to: Candidate | None = None) -> str:
        """The `--set` flags of this layout; those that change `relative_to`'s, where given (the mesh as a
        whole, so that its sizes still multiply to the device count)."""
        sets = self.overrides()
        if relative_to is not None:
            before = set(relative_to.overrides())
            mesh_changed = any(s.startswith("mesh.") and s not in before for s in sets)
            sets = [s for s in sets if s not in before or (mesh_changed and s.startswith("mesh."))]
        return " ".join(f"--set {s}" for s in sets)


def apply(config: Config, c: Candidate) -> Config:
    """`config` laid out as `c` (the model, data and optimizer as they were)."""
    mesh = MeshConfig(data=c.data, fsdp=c.fsdp, tensor=c.tensor, pipeline=c.pipeline, axes=dict(config.mesh.axes))
    train = dataclasses.replace(config.train, microbatches=c.microbatches, remat=c.remat,
                                offload_optimizer=c.offload_optimizer, offload_params=c.offload_params)
    pipeline = config.pipeline
    if c.pipeline > 1:
        pipeline = dataclasses.replace(pipeline, microbatches=c.pipeline_microbatches)
    return dataclasses.replace(config, mesh=mesh, train=train, pipeline=pipeline)


def of_config(config: Config, sizes: dict[str, int]) -> Candidate:
    """The layout a config already has (its resolved mesh sizes)."""
    from jaxscale.parallel.plan import plan_from_config

    stages = sizes["pipeline"]
    pipeline_microbatches = (plan_from_config(config.pipeline, config.model.n_layers, stages).microbatches
                             if stages > 1 else 0)
    return Candidate(sizes["data"], sizes["fsdp"], sizes["tensor"], stages, config.train.microbatches,
                     config.train.remat, config.train.offload_optimizer, pipeline_microbatches,
                     config.train.offload_params)


def factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Ordered tuples of `parts` positive integers whose product is n."""
    if parts == 1:
        yield (n,)
        return
    for first in range(1, n + 1):
        if n % first == 0:
            for rest in factorizations(n // first, parts - 1):
                yield (first, *rest)


def candidates(config: Config, n_devices: int, offload: bool = True) -> list[Candidate]:
    """Every layout of `config` on `n_devices` devices that passes the config checks. `offload`: include host
    offload (optimizer state, master parameters, remat offload), where the device has host memory to move it
    to."""
    found = []
    remats = [r for r in REMAT_CHOICES if offload or not r.startswith("offload:")]
    for data, fsdp, tensor, pipeline in factorizations(n_devices, 4):
        if pipeline not in PIPELINE_CHOICES:
            continue
        for microbatches in MICROBATCH_CHOICES:
            for remat in remats:
                for offload_optimizer, offload_params in (OFFLOAD_CHOICES if offload else OFFLOAD_CHOICES[:1]):
                    for stage_microbatches in ((pipeline, 2 * pipeline) if pipeline > 1 else (0,)):
                        c = Candidate(data, fsdp, tensor, pipeline, microbatches, remat, offload_optimizer,
                                      stage_microbatches, offload_params)
                        try:
                            validate(apply(config, c), n_devices)
                        except ConfigError:
                            continue
                        found.append(c)
    return found
