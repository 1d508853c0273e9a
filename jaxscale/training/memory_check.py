"""Does the compiled train step fit the device? Read from the compiled program itself, before any parameter is
allocated.

The step is compiled ahead of time on abstract inputs (`jit(...).lower(...).compile()`); XLA's
`memory_analysis()` of that executable gives the bytes per device its arguments (state and batch), outputs,
temporaries and code take, less what donation lets outputs reuse. The same executable then runs the training,
so the check costs no second compilation. `jaxscale compile` reads TPU programs compiled through libtpu the same
way.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from jaxscale.errors import ConfigError

log = logging.getLogger("jaxscale")
GB = 1e9


class DoesNotFit(ConfigError):
    """The step needs more memory per device than the device has."""


@dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled program, from XLA's memory analysis."""

    argument_bytes: float
    output_bytes: float
    alias_bytes: float  # outputs written into donated arguments
    temp_bytes: float
    code_bytes: float
    host_bytes: float  # arguments, outputs and temporaries in host memory (memory kind pinned_host)

    @property
    def device_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def step_memory(compiled) -> StepMemory:
    """The memory analysis of a compiled executable (`jax.stages.Compiled`)."""
    m = compiled.memory_analysis()
    host = sum(getattr(m, f"host_{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
    host -= getattr(m, "host_alias_size_in_bytes", 0)
    return StepMemory(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                      alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                      code_bytes=m.generated_code_size_in_bytes, host_bytes=host)


def device_memory_limit(device, limit_gb: float = 0.0) -> tuple[float | None, str]:
    """(bytes one device may use, where that figure comes from). `limit_gb` (train.memory_limit_gb) wins when
    set; then the runtime's own limit (memory_stats()['bytes_limit'], GPUs and TPUs); then the hardware catalog.
    None on a CPU: host memory is shared and has no per-device figure."""
    if limit_gb:
        return limit_gb * GB, "train.memory_limit_gb"
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), "the device's bytes_limit"
    from jaxscale.cost.catalog import CatalogError, accelerator_for_device_kind

    try:
        accelerator = accelerator_for_device_kind(device.device_kind)
    except CatalogError:
        return None, "unknown (the hardware catalog could not be read)"
    if accelerator is None or accelerator.hbm_bytes is None:
        return None, "unknown"
    return accelerator.hbm_bytes, f"the hardware catalog's {accelerator.key}"


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"


ADVICE = ("shard more (mesh.fsdp), recompute activations (train.remat=full or save:NAMES), keep the optimizer "
          "state in host memory (train.offload_optimizer=true, and train.offload_params=true for the master "
          "parameters), or lower the rows per device and step "
          "(train.batch_size, or train.microbatches to accumulate)")


def check_step_memory(compiled, device, limit_gb: float, what: str,
                      fitting_plans: Callable[[float], list[str] | None]) -> StepMemory:
    """Refuse (DoesNotFit) a step whose device bytes exceed the device's limit; otherwise log the bytes.
    `fitting_plans(limit_bytes)` gives the `--set` flags of the nearest plans that fit, one string each, or
    None where there is no planner for the model or the device."""
    memory = step_memory(compiled)
    limit, source = device_memory_limit(device, limit_gb)
    host = f", {size(memory.host_bytes)} in host memory" if memory.host_bytes else ""
    detail = (f"state and batch {size(memory.argument_bytes)}, temporaries {size(memory.temp_bytes)}, "
              f"code {size(memory.code_bytes)}{host}")
    if limit is None or memory.device_bytes <= limit:
        of = f" of {size(limit)} ({source})" if limit else ""
        log.info("the compiled step needs %s per device%s: %s", size(memory.device_bytes), of, detail)
        return memory
    plans = fitting_plans(limit)
    if plans is None:
        fix = f"To fit: {ADVICE}"
    elif plans:
        fix = ("The nearest plans that fit (by the analytic estimate of `jaxscale plan`):\n"
               + "\n".join(f"  {p}" for p in plans))
    else:
        fix = ("No layout on these devices fits by the analytic estimate of `jaxscale plan`: use more devices, a "
               "shorter model.seq_len or a smaller model")
    raise DoesNotFit(f"{what} does not fit: the compiled step needs {size(memory.device_bytes)} per device "
                     f"({detail}), {size(memory.device_bytes - limit)} more than the {size(limit)} available "
                     f"({source}). Nothing was allocated. {fix}")
