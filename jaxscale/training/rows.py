"""Rows of metrics.jsonl as strict JSON. A NaN or infinite value (the loss of a skipped update), which JSON cannot
hold, is written as null and named in the row's "nonfinite" field, by its dotted path:
{"step": 7, "loss": null, ..., "nonfinite": {"loss": "NaN", "grad_norm": "Infinity"}}. Reading a row puts the
values back, so readers see the floats the run had."""
from __future__ import annotations

import json
import math
from typing import Any

NONFINITE_FIELD = "nonfinite"
NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_row(row: dict[str, Any]) -> str:
    """One line of strict JSON (no NaN or Infinity tokens), without the newline."""
    nonfinite: dict[str, str] = {}
    clean = _replace_nonfinite(row, "", nonfinite)
    if nonfinite:
        clean[NONFINITE_FIELD] = nonfinite
    return json.dumps(clean, allow_nan=False)


def _replace_nonfinite(value: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None
    if isinstance(value, dict):
        return {key: _replace_nonfinite(item, f"{path}.{key}" if path else str(key), found)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nonfinite(item, f"{path}.{i}", found) for i, item in enumerate(value)]
    return value


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as it was before `encode_row`: the values named in "nonfinite" restored. Raises ValueError when
    that field does not name null values of the row."""
    nonfinite = row.pop(NONFINITE_FIELD, None)
    if nonfinite is None:
        return row
    if not isinstance(nonfinite, dict):
        raise ValueError(f'"{NONFINITE_FIELD}" must map value paths to NaN, Infinity or -Infinity, got {nonfinite!r}')
    for path, name in nonfinite.items():
        if name not in NONFINITE_NAMES:
            raise ValueError(f'"{NONFINITE_FIELD}" gives {path} as {name!r}; expected NaN, Infinity or -Infinity')
        *parents, leaf = path.split(".")
        node: Any = row
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = int(leaf) if isinstance(node, list) else leaf
            if node[key] is not None:
                raise KeyError(path)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f'"{NONFINITE_FIELD}" names {path}, which is not a null value of the row') from e
        node[key] = NONFINITE_NAMES[name]
    return row
