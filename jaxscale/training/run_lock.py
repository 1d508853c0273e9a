"""One writer per run directory: an exclusive OS file lock on <run_dir>/.lock, held while a run trains.

A second `jaxscale train` on the same run directory stops before it touches anything, naming the run that
holds it. The operating system drops the lock when its holder exits, however it ends (SIGKILL included), so a
crash never leaves a run directory locked. Process 0 of a multi-process run takes the lock for all of them.

A bucket (run_dir=gs://...) has no OS lock; there the lock is a lease: <run_dir>/.lock is an object naming its
holder and when it last renewed it, which a thread of the holder does every RENEW_S seconds. A run finds the
directory busy while the object is younger than LEASE_S; a run killed without letting go leaves a lease that
lapses LEASE_S after its last renewal (the message says so, and which object to delete to go on at once). The
bucket has no create-if-absent through epath, so two runs started within the same second or two can both take
the lease: each reads the object back after writing it, and the one whose record is gone stops.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath

from jaxscale.distributed import any_process
from jaxscale.errors import ConfigError
from jaxscale.run_files import is_url

LOCK_NAME = ".lock"
LEASE_S = 120.0  # a lease not renewed for this long is a dead run's
RENEW_S = 20.0


class RunDirectoryBusy(ConfigError):
    """Another run holds the run directory."""


class RunLock:
    def __init__(self, run_dir: epath.Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None
        self.lease: Lease | None = None
        self.created = not run_dir.exists()  # then a run that fails its checks leaves nothing behind

    def acquire(self) -> RunLock:
        holder = None
        if jax.process_index() == 0:
            holder = self._try_lease() if is_url(self.path) else self._try_lock()
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
        os.pwrite(fd, holder_text().encode(), 0)
        self.fd = fd
        return None

    def _try_lease(self) -> str | None:
        """None once the lease is taken; else who holds it."""
        record = read_lease(self.path)
        if record is not None and time.time() - record["renewed"] < LEASE_S:
            age = time.time() - record["renewed"]
            return (f"{record['holder']}; its lease on {self.path} was renewed {age:.0f} s ago and lapses "
                    f"{LEASE_S:.0f} s after the last renewal: if that run is gone, wait or delete {self.path}")
        lease = Lease(self.path)
        time.sleep(1.0)  # a run that wrote its record in the same moment reads the other's back now
        record = read_lease(self.path)
        if record is None or record["token"] != lease.token:
            return (record or {}).get("holder", "a run that started at the same moment")
        lease.start()
        self.lease = lease
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock; the file stays for the next holder
            self.fd = None
        if self.lease is not None:
            self.lease.stop()  # and deleted: a lease left behind would keep the next run out for LEASE_S
            self.lease = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, *exc_info) -> None:
        self.release()
        run_dir = self.path.parent
        if exc_type is not None and self.created and run_dir.is_dir() and \
                [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            run_dir.rmdir()


def holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def read_lease(path: epath.Path) -> dict | None:
    """The lease record at `path`; None if there is none (or only a record half written, which nobody holds)."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and {"holder", "token", "renewed"} <= record.keys() else None


class Lease:
    """A lease record at `path` (written at once), renewed by a daemon thread from `start` until `stop`."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.token = uuid.uuid4().hex
        self.holder = holder_text()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="jaxscale-run-lease", daemon=True)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps({"holder": self.holder, "token": self.token, "renewed": time.time()}))

    def start(self) -> None:
        self.thread.start()

    def _renew(self) -> None:
        while not self.stopped.wait(RENEW_S):
            try:
                self.write()
            except OSError:  # a store that fails for a moment; the next renewal tries again
                continue

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        record = read_lease(self.path)
        if record is not None and record["token"] == self.token:
            self.path.unlink(missing_ok=True)
