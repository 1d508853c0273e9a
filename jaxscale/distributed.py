"""Several processes (jax is imported where used: the CLI loads this module before it): starting them, watching each other, and restarting them all when one is lost.

- `initialize` joins the processes of a run through `jax.distributed` (gloo collectives for CPU processes).
- `PeerWatchdog`: each process bumps a heartbeat counter in JAX's coordination service every second and
  watches the others'. When a peer stops (SIGKILL, out of memory, a lost host) or the coordinator stops
  answering, every survivor exits within `heartbeat_s` with one line naming the lost process and the newest
  checkpoint, and with EXIT_PEER_LOST: restart all processes to continue from that checkpoint. (Left alone, JAX
  aborts the survivors later, with a native stack trace.)
- `any_process`, `sync_processes`: a flag or a barrier shared by every process of a run.
- `launch_local`: `jaxscale train --num-processes N` with no coordinator runs the N processes on this machine
  and restarts them all, up to a set count, when they stop with a restart code (75 preempted, 76 peer lost).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

EXIT_PEER_LOST = 76  # next to EXIT_PREEMPTED (75): what is saved is good; restart every process to continue
# Exit codes after which every process is started again: preempted (75), a peer lost (76), and 134 (SIGABRT
# through a shell): when the coordinator (process 0) dies, JAX's own client ends the others at once, before the
# watchdog can speak. A process killed by a signal (a negative code from Popen) counts too.
RESTART_CODES = (75, EXIT_PEER_LOST, 134)
DEFAULT_HEARTBEAT_S = 60.0

_heartbeat_s = DEFAULT_HEARTBEAT_S


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
    """Join the run's processes: at `coordinator` (HOST:PORT of process 0), or, with no coordinator, as the
    cluster JAX detects (TPU VMs, SLURM). JAX's own heartbeat is set well above ours, so the watchdog speaks
    first."""
    import jax

    global _heartbeat_s
    _heartbeat_s = heartbeat_s
    if jax.config.jax_platforms in (None, "", "cpu") and coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=int(max(100, 3 * heartbeat_s)))


def _client():
    """JAX's coordination-service client (its key-value store), or None outside a multi-process run."""
    import jax
    from jax._src.distributed import global_state

    return global_state.client if jax.process_count() > 1 else None


class PeerWatchdog:
    """A daemon thread, from `start()` until `stop()`, in every process of a multi-process run; does nothing with
    one process. `newest_checkpoint()` names what a restart continues from, for the exit line."""

    def __init__(self, newest_checkpoint: Callable[[], str], heartbeat_s: float | None = None,
                 interval_s: float = 1.0):
        self.newest_checkpoint = newest_checkpoint
        self.timeout = _heartbeat_s if heartbeat_s is None else heartbeat_s
        self.interval = interval_s
        self.client = _client()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeerWatchdog:
        if self.client is not None:
            self._thread = threading.Thread(target=self._watch, name="jaxscale-peers", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> PeerWatchdog:
        return self.start()

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is not None and self._thread is not None:
            # A collective fails at once when a peer's connection drops (gloo: "Connection closed by peer"):
            # give the watchdog the time to tell a lost peer (it exits with its line and code) from another error.
            self._thread.join(self.timeout + 3 * self.interval)
        self.stop()

    def _watch(self) -> None:
        import jax

        me, count = jax.process_index(), jax.process_count()
        last_seen = {p: (None, time.monotonic()) for p in range(count) if p != me}  # (counter, when it changed)
        coordinator_silent_since = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self.client.key_value_increment(f"jaxscale/heartbeat/{me}", 1)
                beats = dict(self.client.key_value_dir_get("jaxscale/heartbeat/"))
                coordinator_silent_since = None
            except Exception:  # noqa: BLE001 -- any failure of the service counts as silence
                coordinator_silent_since = coordinator_silent_since or now
                if me != 0 and now - coordinator_silent_since > min(self.timeout, 10 * self.interval):
                    self._exit(0, "the coordinator stopped answering")
                continue
            for peer, (counter, since) in last_seen.items():
                value = beats.get(f"jaxscale/heartbeat/{peer}")
                if value != counter:
                    last_seen[peer] = (value, now)
                elif now - since > self.timeout:
                    self._exit(peer, f"sent no heartbeat for {self.timeout:.0f} s")

    def _exit(self, peer: int, why: str) -> None:
        import jax

        try:
            newest = self.newest_checkpoint()
        except Exception:  # noqa: BLE001 -- the line must still be printed
            newest = "unknown"
        print(f"jaxscale: process {peer} of {jax.process_count()} was lost ({why}); this is process "
              f"{jax.process_index()}. The newest checkpoint is {newest}. Exiting with code {EXIT_PEER_LOST}: "
              f"restart all processes (the same command) to continue from it", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)  # a survivor may be blocked in a collective that will never complete


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (the processes must call this together)."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def sync_processes(name: str) -> None:
    """Wait until every process has reached the barrier `name`."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], num_processes: int, max_restarts: int,
                 newest_checkpoint: Callable[[], str]) -> int:
    """Run `jaxscale <argv>` as `num_processes` processes on this machine; when they stop with a restart code
    (or a process is killed by a signal), start them all again from the newest checkpoint, at most `max_restarts`
    times, saying which process was lost first and which checkpoint the restart continues from.
    GPUs are dealt out in equal contiguous groups (CUDA_VISIBLE_DEVICES); CPU processes each get the device count
    XLA_FLAGS gives."""
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    for attempt in range(max_restarts + 1):
        port = free_port()
        processes = []
        for rank in range(num_processes):
            env = dict(os.environ)
            if gpus:
                share = len(gpus) // num_processes
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[rank * share:(rank + 1) * share])
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "jaxscale.cli", *argv, "--coordinator", f"localhost:{port}",
                 "--num-processes", str(num_processes), "--process-id", str(rank)], env=env))
        codes, first_lost = _wait_all(processes)
        worst = next((c for c in codes if c not in (0, *RESTART_CODES) and c >= 0), None)
        if all(c == 0 for c in codes):
            return 0
        if worst is not None:  # a configuration error and the like: restarting would not help
            return worst
        lost = (f"process {first_lost} of {num_processes} was lost first ({_ending(codes[first_lost])}), the "
                f"others stopped with codes {codes}; the newest checkpoint is {newest_checkpoint()}")
        if attempt < max_restarts:
            print(f"jaxscale: {lost}; restarting all {num_processes} ({attempt + 1} of {max_restarts})",
                  file=sys.stderr, flush=True)
    print(f"jaxscale: {lost}; still failing after {max_restarts} restarts, giving up (exit code "
          f"{EXIT_PEER_LOST}); rerun the same command to continue from that checkpoint", file=sys.stderr)
    return EXIT_PEER_LOST


def _ending(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return "aborted, code 134" if code == 134 else f"exit code {code}"


def _wait_all(processes: list[subprocess.Popen]) -> tuple[list[int], int | None]:
    """Wait for every process; Ctrl-C / SIGTERM is passed on to them (they save and exit 75). Returns their exit
    codes and the rank of the first one to end with a non-zero code (a survivor that saw it go ends later)."""
    def forward(signum, _frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failed = None
    try:
        while any(p.poll() is None for p in processes):
            if first_failed is None:
                failed = [r for r, p in enumerate(processes) if p.poll()]
                # of two seen ending together, the one killed by a signal is the cause
                first_failed = min(failed, key=lambda r: processes[r].returncode >= 0) if failed else None
            time.sleep(0.2)
        if first_failed is None:
            first_failed = next((r for r, p in enumerate(processes) if p.returncode), None)
        return [p.returncode for p in processes], first_failed
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
