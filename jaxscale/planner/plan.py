"""Ranking layouts: every candidate estimated, those that fit first, fastest first; the nearest ones that fit
for a run that does not; the top one for `--set plan=auto`; the compiled memory of the top ones where the
device kind can be compiled for here (this machine's CPU devices, or a TPU topology through libtpu)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from jaxscale.config import Config, resolve_mesh_sizes
from jaxscale.errors import ConfigError
from jaxscale.planner.candidates import Candidate, apply, candidates, of_config
from jaxscale.planner.estimate import Estimate, Rates, estimate

log = logging.getLogger("jaxscale")
GB = 1e9


@dataclass(frozen=True)
class Ranked:
    estimate: Estimate
    fits: bool
    compiled_bytes: float | None = None  # per device, from an ahead-of-time compile of the top candidates


def with_memory_limit(rates: Rates, config: Config) -> Rates:
    """train.memory_limit_gb, when set, is the device's memory for planning too."""
    limit = config.train.memory_limit_gb
    return dataclasses.replace(rates, memory_bytes=limit * GB) if limit else rates


def rank(config: Config, n_devices: int, rates: Rates) -> list[Ranked]:
    """Every layout of `config` on `n_devices`, estimated; those that fit first, then by predicted tokens/s."""
    rates = with_memory_limit(rates, config)
    limit = rates.memory_bytes
    ranked = []
    for c in candidates(config, n_devices, offload=rates.host_bytes_per_s is not None):
        e = estimate(config, c, rates)
        ranked.append(Ranked(e, limit is None or e.device_bytes <= limit))
    # equal predictions: no accumulation and no offload first (costs the estimate leaves out), then less memory
    ranked.sort(key=lambda r: (not r.fits, -r.estimate.tokens_per_s, r.estimate.candidate.microbatches,
                               r.estimate.candidate.offload_optimizer, r.estimate.candidate.offload_params,
                               r.estimate.device_bytes))
    return ranked


def changes(a: Candidate, b: Candidate) -> int:
    return sum(getattr(a, f.name) != getattr(b, f.name) for f in dataclasses.fields(Candidate))


def nearest_fitting(config: Config, n_devices: int, rates: Rates, limit: float, compiled_bytes: float,
                    count: int = 3) -> list[str]:
    """The `--set` flags (the changes) of the layouts closest to `config`'s (fewest settings changed, then
    fastest) whose estimate, scaled by how far the compiled step of `config` was from its own estimate, fits
    `limit` bytes."""
    current = of_config(config, resolve_mesh_sizes(config.mesh, n_devices))
    scale = compiled_bytes / estimate(config, current, rates).device_bytes
    fitting = [e for e in (estimate(config, c, rates)
                           for c in candidates(config, n_devices, offload=rates.host_bytes_per_s is not None))
               if e.device_bytes * scale <= limit]
    fitting.sort(key=lambda e: (changes(e.candidate, current), -e.tokens_per_s))
    return [f"{e.candidate.flags(current)}   (predicted {e.device_bytes * scale / GB:.3g} GB per device, "
            f"{e.tokens_per_s:,.0f} tokens/s)" for e in fitting[:count]]


def auto_layout(config: Config, n_devices: int, device_kind: str) -> Config:
    """`--set plan=auto`: the config laid out as the planner's top choice for these devices."""
    from jaxscale.cost.catalog import accelerator_for_device_kind
    from jaxscale.planner.rates import rates_for

    accelerator = accelerator_for_device_kind(device_kind)
    if accelerator is None:
        raise ConfigError(f"plan=auto: the hardware catalog has no entry for this device ({device_kind!r}); add "
                          f"one (JAXSCALE_HARDWARE=FILE), or set the layout yourself (jaxscale plan prints the "
                          f"flags)")
    ranked = rank(config, n_devices, rates_for(accelerator.key, config.train.compute_dtype))
    if not ranked or not ranked[0].fits:
        raise ConfigError(f"plan=auto: no layout of {config.name} fits {n_devices} x {accelerator.key} by the "
                          f"planner's estimate; use more devices, a shorter model.seq_len or a smaller "
                          f"train.batch_size")
    top = ranked[0].estimate
    log.info("plan=auto: %s (predicted %.0f tokens/s, %.2f GB per device)", top.candidate.flags(),
             top.tokens_per_s, top.device_bytes / GB)
    return apply(config, top.candidate)
