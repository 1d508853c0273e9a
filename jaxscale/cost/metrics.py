"""Reading a run's metrics.jsonl (one JSON object per log step: step, loss, mfu, tokens_per_s, ...)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of <run_dir>/metrics.jsonl, in order. Blank lines are skipped; a bad line is an error."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} must be a JSON object, got {line[:60]!r}")
        rows.append(row)
    return rows


def median_of(rows: list[dict], key: str) -> float | None:
    """Median of the numeric, non-null values of `key`; None when there are none."""
    values = [r[key] for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return float(statistics.median(values)) if values else None


def measured_mfu(run_dir: str | Path) -> float | None:
    """Median MFU over a run's log steps (null MFU, as on CPU, is ignored); None when no step has one."""
    return median_of(read_metrics(run_dir), "mfu")
