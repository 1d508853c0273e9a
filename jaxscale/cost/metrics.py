"""Figures from a run's metrics.jsonl (read across restarts by `jaxscale.training.events.read_metrics`)."""
from __future__ import annotations

import statistics
from pathlib import Path

from jaxscale.training.events import read_metrics


def median_of(rows: list[dict], key: str) -> float | None:
    """Median of the numeric, non-null values of `key`; None when there are none."""
    values = [r[key] for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return float(statistics.median(values)) if values else None


def measured_mfu(run_dir: str | Path) -> float | None:
    """Median MFU over a run's log steps (null MFU, as on CPU, is ignored); None when no step has one."""
    return median_of(read_metrics(run_dir), "mfu")
