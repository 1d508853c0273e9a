"""Goodput: where a run's wall-clock time went, across every attempt (a crash, a preemption, a restart).

Each attempt appends records to <run_dir>/goodput.jsonl (process 0 only): a start record, then its running
totals per bucket at every log row and every checkpoint, and an end record if it ends by itself. Nothing is
rewritten, so an attempt killed at any moment leaves what it had done up to its last record, and the next
attempt accounts it:

- lost: productive step time an attempt spent past the checkpoint the next attempt resumed from (computed
  again after the restart);
- restart: from an attempt's last record to the next attempt's start (the crash, the time to notice it and
  start again, process start-up and imports);
- other: the rest of an attempt's time that no bucket names (logging, host-side bookkeeping).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any

from etils import epath

from jaxscale.run_files import LineFile

GOODPUT_FILE = "goodput.jsonl"
# Timed directly by the attempt; "productive" is the training loop's time less the loop's other buckets.
TIMED = ("compile", "startup", "restore", "data_wait", "checkpoint", "eval", "profile")
IN_LOOP = ("data_wait", "checkpoint", "eval", "profile")
BUCKETS = ("productive", *TIMED, "lost", "restart", "other")


class GoodputClock:
    """This attempt's time, by bucket, written to goodput.jsonl as it goes (on process 0)."""

    def __init__(self, run_dir: epath.Path, is_main_process: bool, started: float):
        """started: time.time() when the attempt began (before planning and compiling)."""
        self.path = run_dir / GOODPUT_FILE
        self.write_records = is_main_process
        self.file: LineFile | None = None  # opened at the first record
        self.attempt = uuid.uuid4().hex[:12]
        self.started = started
        self.seconds = dict.fromkeys(TIMED, 0.0)
        self.loop_started: float | None = None  # time.perf_counter() when the training loop began

    def add(self, bucket: str, seconds: float) -> None:
        self.seconds[bucket] += seconds

    @contextmanager
    def timing(self, bucket: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(bucket, time.perf_counter() - start)

    def start_loop(self, step: int) -> None:
        """The loop begins at `step` (the checkpoint it resumed from, or 0)."""
        self.loop_started = time.perf_counter()
        self._write({"kind": "start", "t": self.started, "step": step})
        self.record(step)

    def totals(self) -> dict[str, float]:
        loop_s = time.perf_counter() - self.loop_started if self.loop_started is not None else 0.0
        productive = max(0.0, loop_s - sum(self.seconds[b] for b in IN_LOOP))
        return {"productive": productive, **self.seconds}

    def record(self, step: int, kind: str = "progress") -> None:
        """The running totals with `step` steps done (at a log row, a checkpoint, the end)."""
        self._write({"kind": kind, "t": time.time(), "step": step, "seconds": self.totals()})

    def _write(self, record: dict[str, Any]) -> None:
        if self.write_records:
            self.file = self.file or LineFile(self.path)
            # in a bucket the running totals go up with the next upload; the other records at once
            self.file.write(json.dumps({"attempt": self.attempt, **record}) + "\n", now=record["kind"] != "progress")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_records(path: epath.Path) -> list[dict]:
    """The records, in order; a line a killed attempt left half written is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def account(run_dir: str | os.PathLike) -> dict | None:
    """The time account of every attempt recorded in run_dir: seconds and shares per bucket, goodput (the
    productive share), attempts. None if nothing was recorded."""
    path = epath.Path(run_dir) / GOODPUT_FILE
    if not path.is_file():
        return None
    attempts: dict[str, list[dict]] = {}
    for record in read_records(path):
        attempts.setdefault(record["attempt"], []).append(record)
    runs = [records for records in attempts.values() if records[0]["kind"] == "start" and len(records) > 1]
    if not runs:
        return None
    seconds = dict.fromkeys(BUCKETS, 0.0)
    for index, records in enumerate(runs):
        start, last = records[0], records[-1]
        spent = dict(last["seconds"])
        if index + 1 < len(runs):
            following = runs[index + 1][0]
            # the next attempt resumed from a checkpoint at following["step"]: work past it was done again
            kept = [r for r in records[1:] if r["step"] <= following["step"]]
            kept_productive = kept[-1]["seconds"]["productive"] if kept else 0.0
            seconds["lost"] += max(0.0, spent["productive"] - kept_productive)
            spent["productive"] = min(spent["productive"], kept_productive)
            seconds["restart"] += max(0.0, following["t"] - last["t"])
        for bucket, value in spent.items():
            seconds[bucket] += value
        seconds["other"] += max(0.0, (last["t"] - start["t"]) - sum(last["seconds"].values()))
    total = sum(seconds.values())
    shares = {bucket: value / total if total else 0.0 for bucket, value in seconds.items()}
    return {"goodput": shares["productive"], "total_s": total, "attempts": len(runs), "seconds": seconds,
            "shares": shares}


def describe(goodput: dict) -> str:
    """`goodput 91.3% (restart 4.1%, compile 2.2%, ...)` over `attempts` attempts."""
    rest = sorted(((share, bucket) for bucket, share in goodput["shares"].items()
                   if bucket != "productive" and share >= 0.0005), reverse=True)
    parts = ", ".join(f"{bucket} {share:.1%}" for share, bucket in rest)
    attempts = goodput["attempts"]
    return (f"goodput {goodput['goodput']:.1%} ({parts}) of {goodput['total_s']:.1f} s over {attempts} "
            f"attempt{'s' if attempts != 1 else ''}")
