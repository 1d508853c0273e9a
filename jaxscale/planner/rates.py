"""A device kind's rates for the planner: from the hardware catalog, or measured here for the CPU."""
from __future__ import annotations

import time

from jaxscale.cost.catalog import Accelerator, load_catalog
from jaxscale.errors import ConfigError
from jaxscale.planner.estimate import Rates


def find_kind(kind: str, catalog: dict[str, Accelerator] | None = None) -> Accelerator:
    """A catalog entry by its key (h200, tpu-v5e) or a short name (H100, v5e), case-insensitively."""
    catalog = load_catalog() if catalog is None else catalog
    wanted = kind.strip().lower()
    for key in (wanted, f"tpu-{wanted}"):
        if key in catalog:
            return catalog[key]
    starts = [key for key in catalog if key.startswith(wanted)]
    if len(starts) == 1:
        return catalog[starts[0]]
    raise ConfigError(f"--device-kind {kind}: not in the hardware catalog; known: {', '.join(catalog)} "
                      f"(short forms such as H100, v5e work too)")


def measured_cpu_rates() -> tuple[float, float]:
    """(FLOP/s of a float32 matmul, bytes/s of an array copy) on this machine's first CPU device, measured."""
    import jax
    import jax.numpy as jnp

    n = 1024
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("cpu")[0])
    matmul = jax.jit(lambda x: x @ x)
    copy = jax.jit(lambda x: x + 1)
    big = jax.device_put(jnp.ones((16 * 2 ** 20,), jnp.float32), jax.devices("cpu")[0])
    matmul(a).block_until_ready()
    copy(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        matmul(a).block_until_ready()
    flops = 3 * 2 * n ** 3 / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(3):
        copy(big).block_until_ready()
    copied = 3 * 2 * big.nbytes / (time.perf_counter() - start)  # read and written
    return flops, copied


def rates_for(kind: str, compute_dtype: str = "auto") -> Rates:
    """The rates `jaxscale plan` scores layouts with. GPUs and TPUs: the catalog's peak times its measured MFU
    (the peak itself where none was measured, said in `efficiency_note`), half its interconnect figure (quoted
    for both directions), its host link, the fraction of collective time it was measured to hide (0 if none).
    CPU: measured now on this machine; simulated devices share its cores, so the figures rank layouts rather
    than predict their speed."""
    accelerator = find_kind(kind)
    cpu = accelerator.key == "cpu"
    compute_bytes = 4 if compute_dtype == "float32" or (compute_dtype == "auto" and cpu) else 2
    if cpu:
        flops, copied = measured_cpu_rates()
        return Rates("cpu", flops, "a float32 matmul measured on this CPU", copied, copied, None, compute_bytes,
                     fused_attention=False)
    if accelerator.peak_bf16_flops is None:
        raise ConfigError(f"--device-kind {kind}: the catalog has no peak FLOP/s for {accelerator.key}; add it "
                          f"with --catalog FILE")
    mfu = accelerator.measured_mfu
    note = (f"{accelerator.key}'s measured MFU {mfu:.1%} (catalog)" if mfu else
            f"the peak of {accelerator.key}: no MFU measured on it yet (catalog measured_mfu)")
    link = accelerator.interconnect_bytes_per_s / 2 if accelerator.interconnect_bytes_per_s else None
    return Rates(accelerator.key, accelerator.peak_bf16_flops * (mfu or 1.0), note, link,
                 accelerator.host_bytes_per_s, accelerator.hbm_bytes, compute_bytes, fused_attention=True,
                 collective_overlap=accelerator.collective_overlap or 0.0)
