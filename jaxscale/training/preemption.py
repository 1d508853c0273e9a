"""Preemption notices (SIGTERM, SIGINT): finish the step, save, wait for the save, exit with EXIT_PREEMPTED.

All processes must stop after the same step, or the one that saves waits forever for the others. With one
process a signal flag is enough. With several, JAX's preemption service (started by
jax.distributed.initialize) catches SIGTERM on any process, tells the others through the coordination
service, and `reached_preemption_sync_point` turns true on every process at the same step; SIGINT is handed
to it as a SIGTERM. Where the service is switched off (jax_enable_preemption_service=false) the processes
agree on the signal flag with a tiny all-gather after every step. A second signal stops at once, without
saving.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

from jaxscale.distributed import any_process

log = logging.getLogger("jaxscale")

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". The state is saved; rerunning the same command
# continues the run. Schedulers can requeue on it, and it differs from being killed by SIGTERM (143).
EXIT_PREEMPTED = 75

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def jax_preemption_service_running() -> bool:
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatcher:
    """Use as a context manager around the loop; ask `should_stop(step)` once after every step, on every
    process, with the number of steps done."""

    def __init__(self):
        self.jax_service = jax_preemption_service_running()
        self.received: str | None = None  # name of the first signal, one process only
        self.previous_handlers: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM / SIGINT will not save a checkpoint first")
            return self
        # With JAX's preemption service running SIGTERM stays with it: a Python handler would replace its own
        for signum in (signal.SIGINT,) if self.jax_service else SIGNALS:
            self.previous_handlers[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second notice: stop now, as the default handler would
            log.warning("%s again: stopping without saving", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting with code %d "
                    "(send it again to stop at once without saving)", name, EXIT_PREEMPTED)
        if self.jax_service:  # let JAX's service agree on the step with the other processes
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, steps_done: int) -> bool:
        if self.jax_service:
            return multihost_utils.reached_preemption_sync_point(steps_done)
        return any_process(self.received is not None)  # no collective with a single process
