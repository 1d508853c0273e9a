"""The planner's best layouts compiled ahead of time, where the device kind can be compiled for here: the CPU's
own devices, or a TPU slice through libtpu. Above both the planner (estimates) and training (the step it
compiles)."""
from __future__ import annotations

import dataclasses
import logging

import jax

from jaxscale.config import Config
from jaxscale.planner.candidates import apply
from jaxscale.planner.estimate import Rates
from jaxscale.planner.plan import Ranked, with_memory_limit
from jaxscale.tpu_compile import compile_for_topology, parse_topology
from jaxscale.training.language_model import lm_batch_spec
from jaxscale.training.memory_check import DoesNotFit, step_memory
from jaxscale.training.trainer import build_trainer

log = logging.getLogger("jaxscale")


def compile_check(config: Config, ranked: list[Ranked], rates: Rates, n_devices: int, top: int) -> list[Ranked]:
    """The compiled bytes per device of the first `top` fitting layouts, where the device kind can be compiled
    for here: the CPU's own devices, or a TPU slice of n_devices chips described by libtpu; a layout whose
    compiled step exceeds the device's memory no longer fits. Other kinds are left as they are."""
    kind, limit = rates.kind, with_memory_limit(rates, config).memory_bytes

    if kind == "cpu":
        if jax.device_count() < n_devices:
            log.warning("plan: %d CPU devices here, %d asked for: no compile check", jax.device_count(), n_devices)
            return ranked

        def compiled_bytes(layout: Config) -> float:
            trainer = build_trainer(layout, jax.devices()[:n_devices])
            batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.data_sharding)
                     for k, s in lm_batch_spec(layout).items()}
            return step_memory(trainer.train_step.lower(trainer.abstract_state(), batch).compile()).device_bytes
    elif kind.startswith("tpu-"):
        generation = kind.removeprefix("tpu-")
        cores = n_devices * (2 if generation in ("v4", "v5p") else 1)
        topology = parse_topology(f"{generation}-{cores}")

        def compiled_bytes(layout: Config) -> float:
            return compile_for_topology(layout, topology).bytes_per_chip
    else:
        return ranked
    checked = list(ranked)
    done = 0
    for i, r in enumerate(checked):
        if done == top or not r.fits:
            break
        try:
            got = compiled_bytes(apply(config, r.estimate.candidate))
        except DoesNotFit:  # the TPU compiler ran out of memory
            got = float("inf")
        checked[i] = dataclasses.replace(r, compiled_bytes=got, fits=limit is None or got <= limit)
        done += 1
    checked.sort(key=lambda r: not r.fits)  # stable: a layout the compiler refused moves below those that fit
    return checked
