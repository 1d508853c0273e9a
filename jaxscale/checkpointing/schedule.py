"""When to save: every N steps, and every M minutes since the last save, whichever comes first.

The step rule gives the same answer on every process. The clock does not (processes read it at slightly
different moments), so with several processes the time rule is only consulted every `time_check_every`
steps, and a save happens if any process finds it due: a tiny all-gather, not one per step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import jax

from jaxscale.config import CheckpointConfig
from jaxscale.distributed import any_process


class SaveSchedule:
    def __init__(self, config: CheckpointConfig, clock: Callable[[], float] = time.monotonic):
        self.every_steps = config.every_steps
        self.every_seconds = config.every_minutes * 60
        self.time_check_every = 1 if jax.process_count() == 1 else config.time_check_every
        self.clock = clock
        self.last_save = clock()

    def due(self, steps_done: int) -> bool:
        """Whether to save now that `steps_done` updates are done. All processes call it at every step."""
        by_steps = bool(self.every_steps) and steps_done % self.every_steps == 0
        by_time = False
        if self.every_seconds and steps_done % self.time_check_every == 0:
            by_time = any_process(self.clock() - self.last_save >= self.every_seconds)
        return by_steps or by_time

    def saved(self) -> None:
        self.last_save = self.clock()
