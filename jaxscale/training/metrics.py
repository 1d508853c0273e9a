"""Step metrics: fetched from the device one step late (so the next step is already queued), written as JSON
lines to <run_dir>/metrics.jsonl (strict JSON: see `rows`) and shown on a progress bar. Energy comes from the GPUs' own counters (NVML)
where there are any, summed over all processes; elsewhere its fields are null."""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxscale.cost.energy import EnergyMeter
from jaxscale.run_files import LineFile
from jaxscale.training.rows import encode_row


def device_peak_flops() -> float | None:
    """Dense bf16 peak of one local device from the hardware catalog; None where unknown (the CPU)."""
    from jaxscale.cost.catalog import peak_flops_for_device_kind

    return peak_flops_for_device_kind(jax.local_devices()[0].device_kind)


class MetricsLogger:
    def __init__(self, run_dir: epath.Path, *, total_steps: int, start_step: int, log_every: int, tokens_per_step: int,
                 flops_per_token: float | None, n_devices: int, show_progress: bool, is_main_process: bool,
                 started: float | None = None, tokens_before: int = 0, trackers=None):
        """started (a time.perf_counter() reading) and tokens_before: where the session's clock and token count
        stand, for a logger that takes over after a rollback; rows count both from the session's start.
        trackers: also gets every row (`jaxscale.observe.trackers.Trackers`: TensorBoard, W&B)."""
        self.log_every = log_every
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        peak = device_peak_flops()
        self.cluster_peak = peak * n_devices if peak else None
        self.file = LineFile(run_dir / "metrics.jsonl") if is_main_process else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (show_progress and is_main_process),
                        unit="step", dynamic_ncols=True)
        self.pending: tuple[int, dict, int] | None = None  # (step, metrics, tokens trained through it)
        self.window_start: tuple[int, float] | None = None  # (step, time) the current timing window began
        self.data_wait = 0.0
        self.history: list[dict] = []
        self.trackers = trackers
        self.started = time.perf_counter() if started is None else started
        self.tokens_trained = tokens_before  # this session's, up to the newest pushed step
        self.energy = EnergyMeter()

    def push(self, step: int, metrics: dict[str, jax.Array], data_wait_s: float = 0.0) -> None:
        """Called right after step `step` was dispatched; the previous step's metrics are read now."""
        self.data_wait += data_wait_s
        if self.pending is not None:
            self._complete(*self.pending)
        self.tokens_trained += self.tokens_per_step
        self.pending = (step, metrics, self.tokens_trained)

    def flush(self) -> None:
        if self.pending is not None:
            self._complete(*self.pending)
            self.pending = None

    def _complete(self, step: int, metrics: dict, tokens: int) -> None:
        self.bar.update(1)
        first = self.window_start is None
        if not first and (step + 1) % self.log_every and step + 1 != self.total_steps:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        joules = self._cluster_joules()
        row = {"step": step + 1, **values, "step_time_s": None, "tokens_per_s": None, "mfu": None,
               "data_wait_s": None, "tokens": tokens,
               "elapsed_s": now - self.started, "energy_j": joules, "j_per_token": None, "avg_power_w": None}
        if not first:  # the first step carries the compile time, so timing windows start at its end
            steps = step - self.window_start[0]
            step_time = (now - self.window_start[1]) / steps
            tokens_per_s = self.tokens_per_step / step_time
            row.update(step_time_s=step_time, tokens_per_s=tokens_per_s, data_wait_s=self.data_wait / steps,
                       mfu=tokens_per_s * self.flops_per_token / self.cluster_peak
                       if self.cluster_peak and self.flops_per_token else None)
            if joules is not None:
                row.update(j_per_token=joules / (steps * self.tokens_per_step),
                           avg_power_w=joules / (now - self.window_start[1]))
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.window_start, self.data_wait = (step, now), 0.0
        self.write(row)

    def _cluster_joules(self) -> float | None:
        """Joules since the last read on every process's GPUs; None unless every process can measure."""
        joules = self.energy.read()
        if jax.process_count() > 1:  # all processes log at the same steps, so this gather lines up
            gathered = multihost_utils.process_allgather(np.array(np.nan if joules is None else joules))
            return None if np.isnan(gathered).any() else float(gathered.sum())
        return joules

    def write(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.file:
            self.file.write(encode_row(row) + "\n", now="event" in row)  # an event goes to a bucket at once
        if self.trackers is not None:
            self.trackers.write(row)

    def close(self) -> None:
        self.flush()
        self.bar.close()
        self.energy.close()
        if self.file:
            self.file.close()

