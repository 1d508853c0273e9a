"""Events of a run (start, resume, save, skipped update, rollback, preemption) as rows of metrics.jsonl and
lines on the console, and reading metrics.jsonl back across restarts.

A restart continues metrics.jsonl where the run left off. Rows written after the checkpoint it continues
from (the work a crash lost) come before the restart's "resume" row and are superseded by what follows it;
`read_metrics` applies that rule, so each step appears once, with the values of the run that kept it (event
rows are all kept: they are the history of the run).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from typing import TYPE_CHECKING, Any

from etils import epath

from jaxscale.training.rows import decode_row

if TYPE_CHECKING:  # reading metrics (plots, scaling fits) needs no JAX, which metrics.py brings
    from jaxscale.training.metrics import MetricsLogger

log = logging.getLogger("jaxscale")

# Events after which the run continues from `step`: rows with a higher step before them were lost work.
RESTART_EVENTS = ("start", "resume", "rollback")


def log_event(logger: MetricsLogger, step: int, event: str, message: str, level: int = logging.INFO,
              **fields: Any) -> None:
    """One row {"step", "event", **fields} in metrics.jsonl, and `message` on the console."""
    logger.flush()  # the step rows so far come first
    logger.write({"step": step, "event": event, **fields})
    log.log(level, "step %d: %s", step, message)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (given the file or its run directory) as the surviving run wrote them: where
    a restart continued from step s, earlier metric rows with a step above s are dropped. Non-finite values,
    written as null and named in the row's "nonfinite" field, are NaN or Inf again."""
    path = epath.Path(path)  # a local path or a bucket URL
    if path.is_dir():
        path = path / "metrics.jsonl"
    elif not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give the run directory of a jaxscale train run (or its "
                                f"metrics.jsonl)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {path.parent} a training run directory?")
    try:
        lines = path.read_text().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not text ({e.reason} at byte {e.start}): is it a metrics.jsonl?") from e
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if _cut_short(lines, number):
                log.warning("%s:%d: skipped a row cut short (the run was stopped while writing it)", path, number)
                continue
            raise ValueError(f"{path}:{number} is not JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} must be a JSON object, got {line[:60]!r}")
        try:
            row = decode_row(row)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from e
        if isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number} has no whole-number \"step\", as every row jaxscale train writes "
                             f"has: {line[:60]!r}")
        if row.get("event") in RESTART_EVENTS:  # lost work: metric rows after the step the run went on from
            rows = [r for r in rows if r["step"] <= row["step"] or "event" in r]
        rows.append(row)
    return rows


def _cut_short(lines: list[str], number: int) -> bool:
    """Whether line `number` (1-based) is a row a killed run left half written: the file's last line (no newline
    after it), or a line the next session's MetricsLogger ended before writing its restart event after it."""
    if number == len(lines):
        return True
    try:
        following = json.loads(lines[number])
    except json.JSONDecodeError:
        return False
    return isinstance(following, dict) and following.get("event") in RESTART_EVENTS


def median_of(rows: list[dict], key: str) -> float | None:
    """Median of the numeric, non-null values of `key`; None when there are none."""
    values = [r[key] for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return float(statistics.median(values)) if values else None


def measured_mfu(run_dir: str | os.PathLike) -> float | None:
    """Median MFU over a run's log steps (null MFU, as on CPU, is ignored); None when no step has one."""
    return median_of(read_metrics(run_dir), "mfu")
