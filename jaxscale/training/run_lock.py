"""One writer per run directory: an exclusive OS file lock on <run_dir>/.lock, held while a run trains.

A second `jaxscale train` on the same run directory stops before it touches anything, naming the run that
holds it. The operating system drops the lock when its holder exits, however it ends (SIGKILL included), so a
crash never leaves a run directory locked. Process 0 of a multi-process run takes the lock for all of them.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import jax

from jaxscale.distributed import any_process
from jaxscale.errors import ConfigError

LOCK_NAME = ".lock"


class RunDirectoryBusy(ConfigError):
    """Another run holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created = not run_dir.exists()  # then a run that fails its checks leaves nothing behind

    def acquire(self) -> RunLock:
        holder = self._try_lock() if jax.process_index() == 0 else None
        if any_process(holder is not None):
            self.release()
            who = holder or "a run of other processes"
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by another jaxscale run ({who}): two runs would overwrite each "
                f"other's checkpoints and metrics. Wait for it to end or stop it, or choose another run_dir")
        return self

    def _try_lock(self) -> str | None:
        """None once locked; else what the holder wrote about itself."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock; the file stays for the next holder
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, *exc_info) -> None:
        self.release()
        run_dir = self.path.parent
        if exc_type is not None and self.created and run_dir.is_dir() and \
                [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            run_dir.rmdir()
