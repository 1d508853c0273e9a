"""The one error type for bad configuration: its message names the key, the value and what would work."""
from __future__ import annotations

import math


class ConfigError(ValueError):
    pass


def check_range(key: str, value: float, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, note: str = "", error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming the key, the value and the range unless `value` is a finite number in the range:
    from `low` (excluded if `low_open`) up to `high` (excluded if `high_open`; None: no upper bound)."""
    above = value > low if low_open else value >= low
    if high is None:
        rule, below = f"{'>' if low_open else '>='} {low}", True
    else:
        rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        below = value < high if high_open else value <= high
    finite = not isinstance(value, float) or math.isfinite(value)  # ints are finite (and may not fit a float)
    if not (above and below and finite):
        raise error(f"{key}={value} must be {'' if finite else 'a finite number '}{rule}{note}")
