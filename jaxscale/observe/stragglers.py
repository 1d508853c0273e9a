"""Stragglers: every `stragglers.every` steps each process's step time and data wait over the window are
gathered in one small collective; a process whose time exceeds the median by more than `threshold` of the
median step time for `windows` windows in a row is reported, with the likely cause.

Steps are synchronous, so every process's wall-clock step time is about the same: a process slow to load its
data makes the others wait inside the step. What tells the slow process apart is its data wait (cause "data
wait"); a process whose own step time stands out is reported with cause "compute". A process slow on its
device alone keeps the others waiting inside the step's collectives, which wall-clock windows do not show:
for that, profile the steps (`profile.steps`) on every process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from jaxscale.errors import ConfigError, check_range


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


def find_stragglers(step_time: np.ndarray, data_wait: np.ndarray, threshold: float) -> dict[int, str]:
    """Processes slower than the median by more than threshold x the median step time -> likely cause."""
    median_step, median_wait = float(np.median(step_time)), float(np.median(data_wait))
    limit = threshold * median_step
    slow = {}
    for process, (seconds, wait) in enumerate(zip(step_time, data_wait)):
        if wait - median_wait > limit:
            slow[process] = "data wait"
        elif seconds - median_step > limit:
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

    def check(self, step: int) -> tuple[dict, list[dict]] | None:
        """At the end of each window: (every process's window figures by process, the reports it brings);
        None between windows. Resets the window."""
        if not self.on or step % self.config.every or not self.steps:
            return None
        from jax.experimental import multihost_utils

        mine = np.array([(time.perf_counter() - self.window_start) / self.steps, self.wait / self.steps])
        gathered = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2)
        slow = find_stragglers(gathered[:, 0], gathered[:, 1], self.config.threshold)
        figures = {process: {"step_time_s": float(t), "data_wait_s": float(w)}
                   for process, (t, w) in enumerate(gathered)}
        reports = []
        for process in range(len(self.streak)):
            self.streak[process] = self.streak[process] + 1 if process in slow else 0
            if self.streak[process] == self.config.windows:  # reported once per run of slow windows
                reports.append(self._report(step, process, slow[process], gathered))
        self._reset()
        return figures, reports

    def _report(self, step: int, process: int, cause: str, gathered: np.ndarray) -> dict:
        report = {"step": step, "process": process, "cause": cause, "windows": self.config.windows,
                  "step_time_s": float(gathered[process, 0]), "data_wait_s": float(gathered[process, 1]),
                  "median_step_time_s": float(np.median(gathered[:, 0])),
                  "median_data_wait_s": float(np.median(gathered[:, 1])), "prefetch_depth": None}
        if cause == "data wait" and self.config.grow_prefetch:
            self.depths[process] = min(self.config.max_prefetch, self.depths[process] * 2)
            report["prefetch_depth"] = self.depths[process]
        self.reports.append(report)
        return report


def describe(report: dict) -> str:
    text = (f"process {report['process']} is a straggler ({report['cause']}): {report['step_time_s'] * 1e3:.1f} ms "
            f"a step with {report['data_wait_s'] * 1e3:.1f} ms data wait, against medians "
            f"{report['median_step_time_s'] * 1e3:.1f} and {report['median_data_wait_s'] * 1e3:.1f} ms, for "
            f"{report['windows']} windows")
    if report["prefetch_depth"] is not None:
        text += f"; its data prefetch depth grows to {report['prefetch_depth']}"
    return text
