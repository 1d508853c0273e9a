"""`jaxscale compile`: the real train step compiled for a TPU slice, or several, on any machine.

libtpu (the `tpu` extra) describes a TPU topology without the chips (`jax.experimental.topologies`), and the
train step is lowered on abstract inputs placed on those devices and compiled by the real TPU compiler. What
comes back is what a TPU VM would run: its memory per chip, its FLOPs and its collectives, before anyone pays
for the slice.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from jaxscale.errors import ConfigError
from jaxscale.extras import require
from jaxscale.training.memory_check import ADVICE, DoesNotFit, step_memory

# Cloud TPU generation -> (JAX's name, torus dimensions, the number the accelerator type counts per chip).
# v4 and v5p names count TensorCores (two per chip: v5p-1024 is 512 chips); v5e and v6e names count chips.
GENERATIONS = {"v4": ("v4", 3, 2), "v5p": ("v5p", 3, 2), "v5e": ("v5e", 2, 1), "v5litepod": ("v5e", 2, 1),
               "v6e": ("v6e", 2, 1)}
COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|ragged-all-to-all|"
                        r"collective-permute|collective-broadcast)(?:-start)?\(")
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
GIB = 2 ** 30


@dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. v5e-256
    jax_name: str  # e.g. v5e:16x16
    chips: int  # per slice
    chips_per_host: tuple[int, int, int]


@dataclass(frozen=True)
class CompileReport:
    experiment: str
    topology: Topology
    slices: int
    device_kind: str
    mesh: str
    compile_s: float
    bytes_per_chip: float  # arguments + outputs - donated + temporaries + code
    argument_bytes: float
    temp_bytes: float
    code_bytes: float
    hbm_bytes: float | None  # the chip's, from the hardware catalog
    xla_flops: float | None  # per chip per step, XLA's count (a loop's body counted once)
    model_flops: float  # per chip per step, 6N + 12 L d T
    collectives: dict[str, int]
    custom_calls: tuple[str, ...]  # kernels and runtime calls of the program, e.g. a Pallas kernel's target

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.bytes_per_chip <= self.hbm_bytes


def parse_topology(name: str) -> Topology:
    """A Cloud TPU accelerator type (v5e-256, v5litepod-16, v5p-1024, v6e-256, v4-32) or JAX's own form
    (v5e:16x16, v5p:8x8x8)."""
    generation, sep, rest = name.partition(":")
    if sep:  # JAX's form: the torus shape itself
        shape = [int(x) for x in rest.split("x")] if re.fullmatch(r"\d+(x\d+){1,2}", rest) else []
        if generation not in {g for g, _, _ in GENERATIONS.values()} or not shape:
            raise ConfigError(f"--topology {name}: expected GENERATION:SHAPE such as v5e:16x16 or v5p:8x8x8, "
                              f"or a Cloud TPU type such as v5e-256")
        chips = math.prod(shape)
        return Topology(name, name, chips, _chips_per_host(generation, chips))
    generation, _, count = name.rpartition("-")
    if generation not in GENERATIONS or not count.isdigit():
        raise ConfigError(f"--topology {name}: expected a Cloud TPU type such as v5e-256, v5p-1024, v6e-256 or "
                          f"v4-32 (generations: {', '.join(GENERATIONS)}), or JAX's form such as v5e:16x16")
    jax_generation, dims, per_chip = GENERATIONS[generation]
    chips = int(count) // per_chip
    if chips < 1 or chips & (chips - 1) or int(count) % per_chip or (dims == 3 and chips < 4):
        raise ConfigError(f"--topology {name}: {generation} slices come in powers of two"
                          + (" of at least 8 TensorCores (v5p-8 is 4 chips)" if dims == 3 else " of chips"))
    k = chips.bit_length() - 1
    if dims == 2:  # e.g. 8 -> 2x4, 256 -> 16x16
        shape = [2 ** (k // 2), 2 ** (k - k // 2)]
    elif chips == 4:  # the smallest 3-D slice is one host's 2x2x1
        shape = [2, 2, 1]
    else:  # 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 512 -> 8x8x8
        shape = [2 ** (k // 3 + (i >= 3 - k % 3)) for i in range(3)]
    return Topology(name, f"{jax_generation}:{'x'.join(map(str, shape))}", chips,
                    _chips_per_host(jax_generation, chips))


def _chips_per_host(generation: str, chips: int) -> tuple[int, int, int]:
    """Hosts hold 4 chips (2x2), except single-host v5e / v6e slices of 8 (2x4) and smaller ones."""
    if chips <= 2:
        return (chips, 1, 1)
    if chips == 8 and generation in ("v5e", "v6e"):
        return (2, 4, 1)
    return (2, 2, 1)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[list[str]]:
    """Hold back what is written to file descriptor 2 (libtpu's start-up warnings about TPU_ACCELERATOR_TYPE and
    worker hostnames, written from C++); the lines are handed to the caller to show when something fails."""
    held: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            held.extend(log.read().splitlines())


def tpu_devices(topology: Topology, slices: int) -> list:
    """The devices of `slices` slices of `topology`, described by libtpu; no TPU needed."""
    require("libtpu", "tpu", "compiling for a TPU topology")
    from jax.experimental import topologies

    # Nothing here opens a chip, so another process holding libtpu (a run, another compile) is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with quiet_stderr() as held:
        try:
            description = topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name,
                                                       chips_per_host_bounds=topology.chips_per_host,
                                                       num_slices=slices)
        except Exception as e:  # libtpu raises JaxRuntimeError / ValueError for shapes it does not know
            error = e
        else:
            error = None
    if error is not None:
        raise ConfigError(f"libtpu cannot describe {slices} x {topology.jax_name}: {error}"
                          + "".join(f"\n  {line}" for line in held[-5:])) from error
    return list(description.devices)


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective instructions of a compiled program by kind, each counted once (a loop body once). The TPU
    compiler writes a reduce-scatter as a fusion named all-reduce-scatter around an all-reduce."""
    counts: Counter = Counter()
    in_reduce_scatter = False
    for line in hlo_text.splitlines():
        if line.endswith("{") and not line.startswith(" "):  # a computation starts
            in_reduce_scatter = line.lstrip("%").startswith("all-reduce-scatter")
            continue
        match = COLLECTIVE.search(line)
        if match:
            counts["reduce-scatter" if in_reduce_scatter and match[1] == "all-reduce" else match[1]] += 1
    return dict(sorted(counts.items()))


def compile_for_topology(config, topology: Topology, slices: int = 1) -> CompileReport:
    """Compile the train step of `config` for `slices` x `topology` and measure the program."""
    import jax

    from jaxscale.cost.catalog import accelerator_for_device_kind
    from jaxscale.mesh import describe
    from jaxscale.training.language_model import lm_batch_spec
    from jaxscale.training.trainer import build_trainer

    devices = tpu_devices(topology, slices)
    trainer = build_trainer(config, devices=devices)
    batch = {key: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=trainer.data_sharding)
             for key, spec in lm_batch_spec(config).items()}
    start = time.perf_counter()
    with quiet_stderr() as held:
        try:
            compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the step does not fit, and others
            error = e
        else:
            error = None
    if error is not None:
        first = str(error).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            raise DoesNotFit(f"the TPU compiler ran out of memory for {config.name} on "
                             f"{slice_name(topology, slices)}: {first}\n{ADVICE}") from error
        raise ConfigError(f"the TPU compiler refused the step: {first}"
                          + "".join(f"\n  {line}" for line in held[-5:])) from error
    compile_s = time.perf_counter() - start
    memory = step_memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older jax
    accelerator = accelerator_for_device_kind(devices[0].device_kind)
    chips = len(devices)
    hlo = compiled.as_text()
    return CompileReport(
        experiment=config.name, topology=topology, slices=slices, device_kind=devices[0].device_kind,
        mesh=describe(trainer.mesh), compile_s=compile_s, bytes_per_chip=memory.device_bytes,
        argument_bytes=memory.argument_bytes, temp_bytes=memory.temp_bytes, code_bytes=memory.code_bytes,
        hbm_bytes=accelerator.hbm_bytes if accelerator else None,
        xla_flops=(cost or {}).get("flops"),
        model_flops=config.model.flops_per_token() * config.train.batch_size * config.model.seq_len / chips,
        collectives=collective_counts(hlo), custom_calls=tuple(sorted(set(CUSTOM_CALL.findall(hlo)))))


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def slice_name(topology: Topology, slices: int) -> str:
    return f"{slices} x {topology.name}" if slices > 1 else topology.name


def format_report(r: CompileReport) -> str:
    where = slice_name(r.topology, r.slices)
    chips = r.topology.chips * r.slices
    lines = [f"compiled the train step of {r.experiment} for {where} ({chips} chips, {r.device_kind}, "
             f"{r.topology.jax_name}) in {r.compile_s:.1f} s",
             f"mesh: {r.mesh}",
             "per chip:",
             f"  memory       {_size(r.bytes_per_chip)}"
             + (f" of {_size(r.hbm_bytes)} HBM ({100 * r.bytes_per_chip / r.hbm_bytes:.0f}%)"
                if r.hbm_bytes else " (HBM unknown: the hardware catalog has no entry for this chip)")
             + f": state and batch {_size(r.argument_bytes)}, temporaries {_size(r.temp_bytes)}, "
               f"code {_size(r.code_bytes)}",
             f"  FLOPs/step   {r.model_flops:.3g} (6N + 12LdT)"
             + (f"; XLA's count {r.xla_flops:.3g} (a loop body counted once: with train.scan_unroll below "
                f"n_layers it sees part of the layers)" if r.xla_flops else ""),
             "  collectives  " + (", ".join(f"{kind} {n}" for kind, n in r.collectives.items()) or "none")
             + " (instructions in the program)"]
    if r.fits is False:
        lines.append(f"DOES NOT FIT: {_size(r.bytes_per_chip)} per chip > {_size(r.hbm_bytes)} of HBM\n{ADVICE}")
    elif r.fits:
        lines.append(f"fits: {_size(r.bytes_per_chip)} of {_size(r.hbm_bytes)} per chip")
    return "\n".join(lines)
