"""Measured energy: NVML's per-GPU energy counters, and the end-of-training energy and cost summary.

NVML (the `pynvml` module of the `nvidia-ml-py` package, the optional `gpu` extra) counts each GPU's energy since
the driver loaded, in millijoules (`nvmlDeviceGetTotalEnergyConsumption`, Volta and later). The meter reads those
counters for this process's GPUs and returns the difference since its previous read. On CPU and TPU, without the
package, or on a GPU without the counter, it returns None: measuring energy must never stop a training run.

Only the GPU boards are measured, not the host's CPUs, memory, network or cooling.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from jaxscale.cost.catalog import Accelerator


class EnergyMeter:
    """Joules used by this process's local GPUs between calls to `read()`."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml
        except ImportError:  # nvidia-ml-py is the optional `gpu` extra
            pynvml = None
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in _local_gpu_indices(pynvml)]
            except pynvml.NVMLError:  # no driver (CPU, TPU hosts) or no GPU
                self._handles = []
        self._last_mj = self._total_mj()

    @property
    def available(self) -> bool:
        return self._last_mj is not None

    def read(self) -> float | None:
        """Joules consumed since the previous read (since construction, the first time); None if unmeasurable."""
        total = self._total_mj()
        if total is None or self._last_mj is None:
            self._last_mj = total
            return None
        joules = (total - self._last_mj) / 1000.0
        self._last_mj = total
        return joules

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml, self._handles, self._last_mj = None, [], None

    def _total_mj(self) -> int | None:
        if not self._handles:
            return None
        try:
            return sum(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles)
        except self._nvml.NVMLError:  # e.g. NVMLError_NotSupported before Volta
            return None


def _local_gpu_indices(pynvml: Any) -> list[int]:
    """NVML indices of the GPUs this process sees: CUDA_VISIBLE_DEVICES if set (indices or UUIDs), else all."""
    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    if all(v.isdigit() for v in wanted):
        return [int(v) for v in wanted if int(v) < count]
    uuids = {_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))): i for i in range(count)}
    return [i for uuid, i in uuids.items() if any(uuid.startswith(w) for w in wanted)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def run_summary(metrics_rows: list[dict], hardware_entry: Accelerator | None, chips: int = 1, *,
                tokens: float | None = None, wall_s: float | None = None) -> dict:
    """End-of-training totals from metrics.jsonl rows.

    Reads, from the rows: `tokens` (cumulative tokens trained, last row), `elapsed_s` (wall seconds since the
    start of training, last row) and `energy_j` (joules since the previous log row, null when unmeasured);
    `tokens` and `wall_s` given here take the place of the last row's (a run that stopped between log rows
    trained more than its last row says). `chips` is the number of chips the run used (jax.device_count()), for
    the cost and the TDP bound. Figures that cannot be computed are None.
    """
    last = metrics_rows[-1] if metrics_rows else {}
    tokens = _number(last.get("tokens")) if tokens is None else tokens
    wall_s = _number(last.get("elapsed_s")) if wall_s is None else wall_s
    measured = [_number(r.get("energy_j")) for r in metrics_rows]
    measured = [j for j in measured if j is not None]
    energy_j = sum(measured) if measured else None
    chip_hours = chips * wall_s / 3600.0 if wall_s is not None else None
    price = hardware_entry.price_usd_per_chip_hour if hardware_entry else None
    tdp = hardware_entry.tdp_watts if hardware_entry else None
    return {
        "hardware": hardware_entry.key if hardware_entry else None,
        "chips": chips,
        "tokens": tokens,
        "wall_s": wall_s,
        "chip_hours": chip_hours,
        "energy_j": energy_j,
        "energy_kwh": energy_j / 3.6e6 if energy_j is not None else None,
        "j_per_token": energy_j / tokens if energy_j is not None and tokens else None,
        "avg_power_w": energy_j / wall_s if energy_j is not None and wall_s else None,
        "tdp_bound_kwh": chip_hours * tdp / 1000.0 if chip_hours is not None and tdp is not None else None,
        "price_usd_per_chip_hour": price,
        "price_date": hardware_entry.price_date if hardware_entry else None,
        "cost_usd": chip_hours * price if chip_hours is not None and price is not None else None,
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
