"""A jax.profiler trace of chosen training steps (`profile.steps=100:105`), on every process, into the run
directory in the layout TensorBoard's profile plugin reads (<dir>/plugins/profile/<session>/<host>.xplane.pb,
beside a Perfetto trace), and a short summary of it from `jaxscale.trace_summary`. In a bucket (run_dir=gs://)
the trace is written to a local folder and copied there once it stops: the profiler writes gs:// only through
TensorFlow's file system, which jaxscale does not install."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from etils import epath

from jaxscale.errors import ConfigError
from jaxscale.run_files import StagedDirectory
from jaxscale.trace_summary import DeviceTime, format_summary, summarize

log = logging.getLogger("jaxscale")


@dataclass
class ProfileConfig:
    # "START:STOP": trace the steps numbered START to STOP - 1 (as in metrics.jsonl); empty: no trace
    steps: str = ""

    def __post_init__(self):
        self.window()

    def window(self) -> tuple[int, int] | None:
        if not self.steps:
            return None
        start, sep, stop = str(self.steps).partition(":")
        try:
            first, end = int(start), int(stop)
        except ValueError:
            first = end = 0
        if not sep or first < 1 or end <= first:
            raise ConfigError(f"profile.steps={self.steps!r} must be START:STOP with 1 <= START < STOP (steps "
                              f"numbered as in metrics.jsonl; STOP is not traced), e.g. --set profile.steps=100:105")
        return first, end


def trace_dir(run_dir: epath.Path) -> epath.Path:
    """Each process's own folder: processes on one machine share a host name, which names the trace files."""
    import jax

    return epath.Path(run_dir) / "profile" / f"process_{jax.process_index()}"


def shares(device: DeviceTime) -> dict[str, float]:
    """Where one device's span went: compute (kernels other than collectives running), communication that no
    compute hid, and idle time; fractions of the span."""
    span = device.span_ms or 1.0
    return {"compute": (device.busy_ms - device.exposed_collective_ms) / span,
            "communication": device.exposed_collective_ms / span, "idle": device.idle_ms / span}


def describe(devices: list[DeviceTime], top: int = 5) -> str:
    shown = [DeviceTime(**{**d.__dict__, "top": d.top[:top]}) for d in devices]
    lines = [format_summary(shown)]
    for d in devices:
        lines.append(f"{d.device}: " + ", ".join(f"{k} {v:.1%}" for k, v in shares(d).items()))
    return "\n".join(lines)


class StepProfiler:
    """Starts the trace before step START (or the first step of the window this session trains) is dispatched
    and stops it once step STOP - 1 has finished; one trace per session."""

    def __init__(self, config: ProfileConfig, run_dir: epath.Path, total_steps: int):
        self.window = config.window()
        if self.window and self.window[1] - 1 > total_steps:
            raise ConfigError(f"profile.steps={config.steps} reaches past train.steps={total_steps}; trace steps "
                              f"inside the run, e.g. --set profile.steps={max(1, total_steps - 4)}:{total_steps + 1}")
        self.directory = trace_dir(run_dir)
        self.staged: StagedDirectory | None = None  # where the profiler writes: self.directory, or a local copy
        self.active = False
        self.traced = 0  # steps dispatched since the trace started
        self.summary: list[DeviceTime] | None = None

    def before(self, step: int) -> None:
        """Called before the step numbered `step` is dispatched."""
        import jax

        # inside the window rather than at its start: a run resumed from a checkpoint within it traces the rest
        if self.window and self.window[0] <= step < self.window[1] and not self.active and self.summary is None:
            self.staged = StagedDirectory(self.directory)
            jax.profiler.start_trace(str(self.staged.local), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Called after the step numbered `step` was dispatched, with the state it returns."""
        import jax

        if not self.active:
            return
        self.traced += 1
        if step == self.window[1] - 1:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        import jax

        jax.profiler.stop_trace()
        self.active = False
        try:
            self._summarize()
        finally:
            self.staged.upload(remove=True)

    def _summarize(self) -> None:
        try:
            self.summary = summarize(self.staged.local, max(1, self.traced))
        except (OSError, ValueError, KeyError) as e:  # the trace is for reading elsewhere; training goes on
            self.summary = []
            log.warning("profile of steps %s written to %s, but not summarized: %s", self.window, self.directory, e)
            return
        log.info("profile of steps %s in %s (tensorboard --logdir %s; Perfetto opens the .trace.json.gz):\n%s",
                 f"{self.window[0]}:{self.window[1]}", self.directory, self.directory, describe(self.summary))

    def close(self) -> None:
        """A run that ended inside the window (preempted) still leaves the trace it took."""
        if self.active:
            self.stop()
