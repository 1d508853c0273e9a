"""Stragglers: every `stragglers.every` steps each process's step time, data wait and batch load time over the
window are gathered in one small collective; a process above the median by more than `threshold` of the median
step time, for `windows` windows in a row, is reported with the likely cause.

Steps are synchronous, so every process's wall-clock step time is about the same: a process slow to load its
data makes the others wait inside the step, and while its loader keeps just ahead, even its own data wait stays
small. What tells it apart is the time its loader spends per batch, or its data wait (cause "data"). A process
whose own step time stands out is reported with cause "compute". A process slow on its device alone keeps the
others waiting inside the step's collectives, which wall-clock windows do not show: for that, profile the steps
(`profile.steps`) on every process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from jaxscale.errors import ConfigError, check_range

FIGURES = ("step_time_s", "data_wait_s", "load_s")  # per step, over a window, on each process


@dataclass
class StragglerConfig:
    every: int = 50  # steps per window; 0 turns the check off
    threshold: float = 0.2  # excess over the median, as a share of the median step time
    windows: int = 3  # windows in a row before a process is reported
    grow_prefetch: bool = True  # a process slow for its data loads further ahead (data.prefetch doubles)
    max_prefetch: int = 16

    def __post_init__(self):
        check_range("stragglers.every", self.every, 0, note=" (steps per window; 0 turns the check off)")
        check_range("stragglers.threshold", self.threshold, 0, low_open=True,
                    note=" (e.g. 0.2: 20% of the median step time)")
        check_range("stragglers.windows", self.windows, 1)
        check_range("stragglers.max_prefetch", self.max_prefetch, 1)


def find_stragglers(figures: np.ndarray, threshold: float) -> dict[int, str]:
    """figures: (processes, 3) step time, data wait and load time per step. Processes above the median in any
    of them by more than threshold x the median step time -> likely cause ("data" or "compute")."""
    median = np.median(figures, axis=0)
    limit = threshold * median[0]
    slow = {}
    for process, (seconds, wait, load) in enumerate(figures):
        if wait - median[1] > limit or load - median[2] > limit:
            slow[process] = "data"
        elif seconds - median[0] > limit:
            slow[process] = "compute"
    return slow


class StragglerMonitor:
    """Called on every process at every step (the gather is a collective all processes join)."""

    def __init__(self, config: StragglerConfig, process_count: int, prefetch_depth: int):
        if config.grow_prefetch and config.every and process_count > 1 and prefetch_depth == 0:
            raise ConfigError("stragglers.grow_prefetch needs a loader thread to deepen: set data.prefetch >= 1, "
                              "or stragglers.grow_prefetch=false")
        self.config = config
        self.on = bool(config.every) and process_count > 1
        self.streak = np.zeros(process_count, dtype=int)
        self.depths = [prefetch_depth] * process_count  # every process knows every process's depth
        self.reports: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.steps, self.wait, self.window_start = 0, 0.0, time.perf_counter()

    def push(self, wait_s: float) -> None:
        self.steps += 1
        self.wait += wait_s

    def check(self, step: int, batches) -> tuple[dict, list[dict]] | None:
        """At the end of each window: (every process's window figures by process, the reports they bring);
        None between windows. `batches`: this process's Prefetcher, for its load time. Resets the window."""
        if not self.on or step % self.config.every or not self.steps:
            return None
        from jax.experimental import multihost_utils

        mine = np.array([time.perf_counter() - self.window_start, self.wait, batches.take_load_seconds()])
        gathered = np.asarray(multihost_utils.process_allgather(mine / self.steps))  # (processes, 3)
        slow = find_stragglers(gathered, self.config.threshold)
        figures = {process: dict(zip(FIGURES, map(float, row))) for process, row in enumerate(gathered)}
        reports = []
        for process in range(len(self.streak)):
            self.streak[process] = self.streak[process] + 1 if process in slow else 0
            if self.streak[process] == self.config.windows:  # reported once per run of slow windows
                reports.append(self._report(step, process, slow[process], figures, gathered))
        self._reset()
        return figures, reports

    def _report(self, step: int, process: int, cause: str, figures: dict, gathered: np.ndarray) -> dict:
        median = np.median(gathered, axis=0)
        report = {"step": step, "process": process, "cause": cause, "windows": self.config.windows,
                  **figures[process], **{f"median_{name}": float(m) for name, m in zip(FIGURES, median)},
                  "prefetch_depth": None}
        if cause == "data" and self.config.grow_prefetch:
            self.depths[process] = min(self.config.max_prefetch, self.depths[process] * 2)
            report["prefetch_depth"] = self.depths[process]
        self.reports.append(report)
        return report


def describe(report: dict) -> str:
    text = (f"process {report['process']} is a straggler ({report['cause']}): per step "
            + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {report[name] * 1e3:.1f} ms (median "
                        f"{report['median_' + name] * 1e3:.1f})" for name in FIGURES)
            + f", for {report['windows']} windows")
    if report["prefetch_depth"] is not None:
        text += f"; its data prefetch depth grows to {report['prefetch_depth']}"
    return text
