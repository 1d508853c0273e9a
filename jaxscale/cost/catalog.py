"""The hardware catalog: jaxscale/hardware.yaml, with a user's YAML file merged over it field by field.

The user file (`--catalog PATH` or the JAXSCALE_HARDWARE environment variable) has the same shape as the
built-in one. An entry whose name exists already changes only the fields it gives; a new name must give every
field. Every error names the file, the entry and the field.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BUILTIN_CATALOG = Path(__file__).resolve().parent.parent / "hardware.yaml"
CATALOG_ENV_VAR = "JAXSCALE_HARDWARE"

# Per-chip figures; null (None) means unknown.
NUMBER_FIELDS = ("peak_bf16_flops", "hbm_bytes", "hbm_bytes_per_s", "interconnect_bytes_per_s", "tdp_watts",
                 "price_usd_per_chip_hour", "measured_mfu", "host_bytes_per_s", "collective_overlap")
# Figures an entry may leave out (null): those `jaxscale plan` added, so older user files stay valid.
OPTIONAL_FIELDS = ("measured_mfu", "host_bytes_per_s", "collective_overlap", "sources")
ENTRY_FIELDS = ("name", "device_kinds", *NUMBER_FIELDS, "price_date", "sources")


class CatalogError(ValueError):
    """A hardware catalog file that cannot be used; the message names the file, entry and field."""


@dataclass(frozen=True)
class Accelerator:
    key: str  # the catalog name, e.g. "h100-sxm"
    name: str
    device_kinds: tuple[str, ...]  # regexes, matched whole and case-insensitively against jax's device_kind
    peak_bf16_flops: float | None
    hbm_bytes: float | None
    hbm_bytes_per_s: float | None
    interconnect_bytes_per_s: float | None
    tdp_watts: float | None
    price_usd_per_chip_hour: float | None
    price_date: str | None
    sources: dict[str, str]
    from_user_file: bool = False
    measured_mfu: float | None = None  # the best MFU jaxscale measured on it (BENCHMARKS.md); `jaxscale plan`
    host_bytes_per_s: float | None = None  # device <-> host memory, one direction (host offload)
    # the fraction of collective time jaxscale measured hidden behind compute (`jaxscale plan`); None: none known
    collective_overlap: float | None = None

    def matches(self, device_kind: str) -> bool:
        return any(re.fullmatch(p, device_kind.strip(), re.IGNORECASE) for p in self.device_kinds)


def load_catalog(extra_path: str | None = None) -> dict[str, Accelerator]:
    """Built-in catalog merged with `extra_path` (or $JAXSCALE_HARDWARE when that is None)."""
    extra_path = extra_path or os.environ.get(CATALOG_ENV_VAR) or None
    return dict(_load_cached(extra_path))


@functools.lru_cache(maxsize=8)
def _load_cached(extra_path: str | None) -> tuple[tuple[str, Accelerator], ...]:
    builtin = _read_entries(BUILTIN_CATALOG)
    merged = {key: _build(key, raw, BUILTIN_CATALOG, from_user_file=False) for key, raw in builtin.items()}
    if extra_path:
        path = Path(extra_path).expanduser()
        for key, raw in _read_entries(path).items():
            if key in builtin:
                raw = _merge_override(builtin[key], raw, path)
            merged[key] = _build(key, raw, path, from_user_file=True)
    return tuple(merged.items())


def accelerator_for_device_kind(device_kind: str, catalog: dict[str, Accelerator] | None = None
                                ) -> Accelerator | None:
    """The entry whose `device_kinds` match jax's device_kind string; user-file entries are tried first."""
    catalog = load_catalog() if catalog is None else catalog
    ordered = sorted(catalog.values(), key=lambda a: not a.from_user_file)  # stable: catalog order otherwise
    return next((a for a in ordered if a.matches(device_kind)), None)


def peak_flops_for_device_kind(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s per chip for MFU; None for the CPU and for hardware the catalog does not know."""
    try:
        accelerator = accelerator_for_device_kind(device_kind)
    except CatalogError:
        return None  # a broken user catalog must not stop training; `jaxscale estimate` reports the error
    return accelerator.peak_bf16_flops if accelerator else None


def get_accelerator(key: str, catalog: dict[str, Accelerator]) -> Accelerator:
    """Entry `key`, or an error that lists the known names."""
    if key not in catalog:
        close = difflib.get_close_matches(key, list(catalog), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CatalogError(f"unknown hardware {key!r}; {hint}known: {', '.join(catalog)} "
                           f"(add your own with --catalog FILE or ${CATALOG_ENV_VAR})")
    return catalog[key]


# ----------------------------------------------------------------------------------------------------------
# Reading and checking


def _read_entries(path: Path) -> dict[str, dict]:
    user_file = "" if path == BUILTIN_CATALOG else f" (the file given by --catalog or ${CATALOG_ENV_VAR})"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CatalogError(f"hardware catalog {path}{user_file}: cannot read it: {e}") from e
    except UnicodeDecodeError as e:
        raise CatalogError(f"hardware catalog {path}{user_file}: not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"save it as UTF-8 YAML") from e
    except yaml.YAMLError as e:
        raise CatalogError(f"hardware catalog {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or set(data) != {"accelerators"}:
        raise CatalogError(f"hardware catalog {path}: must be a mapping with the single key 'accelerators' "
                           f"(a mapping from entry name to its fields), got {_short(data)}")
    entries = data["accelerators"]
    if not isinstance(entries, dict):
        raise CatalogError(f"hardware catalog {path}: 'accelerators' must map entry names to fields, "
                           f"got {_short(entries)}")
    for key, raw in entries.items():
        where = f"hardware catalog {path}: entry {key!r}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
            raise CatalogError(f"{where}: the name must be letters, digits, '.', '_' or '-'")
        if not isinstance(raw, dict):
            raise CatalogError(f"{where}: must be a mapping of fields, got {_short(raw)}")
        for field in raw:
            if field not in ENTRY_FIELDS:
                close = difflib.get_close_matches(str(field), ENTRY_FIELDS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(ENTRY_FIELDS)}"
                raise CatalogError(f"{where}, field {field!r}: unknown field; {hint}")
    return entries


def _merge_override(base: dict, override: dict, path: Path) -> dict:
    """Fields of `override` replace those of `base`; a figure changed without a source is sourced to the file."""
    merged = {**base, **override}
    sources = dict(base.get("sources") or {})
    given_sources = override.get("sources") or {}
    if isinstance(given_sources, dict):
        for field in NUMBER_FIELDS:
            if field in override and field not in given_sources:
                sources[field] = f"user catalog {path}"
        sources.update(given_sources)
        merged["sources"] = sources
    return merged


def _build(key: str, raw: dict, path: Path, from_user_file: bool) -> Accelerator:
    where = f"hardware catalog {path}: entry {key!r}"
    missing = [f for f in ENTRY_FIELDS if f not in raw and f not in OPTIONAL_FIELDS]
    if missing:
        raise CatalogError(f"{where}: missing field(s) {', '.join(missing)} (a new entry must give every field; "
                           f"use null for a figure you do not know)")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(f"{where}, field 'name': must be a non-empty string, got {_short(name)}")
    figures = {f: _number(raw.get(f), f"{where}, field {f!r}") for f in NUMBER_FIELDS}
    if figures["measured_mfu"] is not None and figures["measured_mfu"] > 1:
        raise CatalogError(f"{where}, field 'measured_mfu': a fraction of the peak in (0, 1], got "
                           f"{figures['measured_mfu']!r}")
    if figures["collective_overlap"] is not None and figures["collective_overlap"] > 1:
        raise CatalogError(f"{where}, field 'collective_overlap': the fraction of the collectives' time hidden "
                           f"behind compute, in (0, 1] (null: none), got {figures['collective_overlap']!r}")
    patterns = raw["device_kinds"]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise CatalogError(f"{where}, field 'device_kinds': must be a list of regular expressions, "
                           f"got {_short(patterns)}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise CatalogError(f"{where}, field 'device_kinds': {p!r} is not a valid regular expression: {e}") from e
    price_date = raw["price_date"]
    if price_date is not None and not isinstance(price_date, str):
        price_date = str(price_date)  # YAML reads 2025-06-01 as a date
    if figures["price_usd_per_chip_hour"] is not None and not price_date:
        raise CatalogError(f"{where}, field 'price_date': a price needs the date it was read (e.g. \"2025-06\")")
    sources = raw.get("sources") or {}
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise CatalogError(f"{where}, field 'sources': must map figure names to strings, got {_short(sources)}")
    for field in sources:
        if field not in NUMBER_FIELDS:
            raise CatalogError(f"{where}, field 'sources': {field!r} is not a figure; figures are "
                               f"{', '.join(NUMBER_FIELDS)}")
    if from_user_file:  # a new user entry need not cite anything: its figures come from the user's file
        sources = {**{f: f"user catalog {path}" for f, v in figures.items() if v is not None}, **sources}
    unsourced = [f for f, v in figures.items() if v is not None and f not in sources]
    if unsourced:
        raise CatalogError(f"{where}, field 'sources': no source for {', '.join(unsourced)}")
    return Accelerator(key=key, name=name.strip(), device_kinds=tuple(patterns), price_date=price_date,
                       sources=dict(sources), from_user_file=from_user_file, **figures)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # YAML 1.1 reads 989e12 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise CatalogError(f"{where}: must be a number or null, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CatalogError(f"{where}: must be a number or null, got {_short(value)}")
    if not math.isfinite(value) or value <= 0:
        raise CatalogError(f"{where}: must be a positive number or null, got {value!r}")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"
