"""A checkpoint's array files, checked before Orbax reads them.

Orbax restores all arrays concurrently on an asyncio event loop. When one read fails it closes that loop while
the other reads are still in flight, and each of them then reports "RuntimeError: Event loop is closed" from a
tensorstore thread: one traceback per array, dozens for a model. So damage that shows in the files themselves
is looked for here first, with plain synchronous reads: unreadable array metadata, a missing or garbled
manifest.ocdbt, a B-tree node that does not decode, a data file that is missing or shorter than the values it
should hold. The array bytes themselves are not read (that would read the checkpoint twice): a flipped bit in
them is caught when Orbax decodes them or by the fingerprints after the restore.
"""
from __future__ import annotations

import json
from pathlib import Path

import tensorstore as ts

from jaxscale.run_files import is_url


class DamagedFiles(ValueError):
    """The message names the file and what is wrong with it."""


def check_array_files(state_dir: Path) -> None:
    """Raise DamagedFiles if the files of an Orbax item directory (e.g. <step>/state) are visibly damaged."""
    metadata = _read_json(state_dir / "_METADATA")
    array_metadatas = state_dir / "array_metadatas"
    for path in sorted(array_metadatas.iterdir()) if array_metadatas.is_dir() else []:
        _read_json(path)  # one per process that wrote arrays
    if isinstance(metadata, dict) and metadata.get("use_ocdbt"):
        _check_ocdbt(state_dir)


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise DamagedFiles(f"{path.name} is missing") from e
    except (OSError, ValueError) as e:  # ValueError: not JSON or not UTF-8
        raise DamagedFiles(f"{path.name} is unreadable: {e}") from e


def _check_ocdbt(state_dir: Path) -> None:
    """Walk the B-tree of the newest version of the OCDBT database in `state_dir`: every node must decode, and
    every file a node or a value lives in must be there and long enough. Only the small node files are read."""
    if not (state_dir / "manifest.ocdbt").is_file():
        raise DamagedFiles("manifest.ocdbt is missing")
    # a bucket URL (gs://...) is a kvstore spec of tensorstore's own
    spec = f"{state_dir}/" if is_url(state_dir) else {"driver": "file", "path": f"{state_dir}/"}
    base = ts.KvStore.open(spec).result()
    sizes: dict[Path, int | None] = {}
    try:
        manifest = ts.ocdbt.dump(base).result()
    except ValueError as e:
        raise DamagedFiles(f"manifest.ocdbt is unreadable: {_first_line(e)}") from e
    versions = manifest.get("versions") or [{}]
    pending = [versions[-1].get("root", {}).get("location")]
    while pending:
        location = pending.pop()
        if not location:
            continue
        _check_extent(state_dir, location, sizes)
        try:
            node = ts.ocdbt.dump(base, location).result()
        except ValueError as e:
            raise DamagedFiles(f"B-tree node {location} is unreadable: {_first_line(e)}") from e
        for entry in node.get("entries", []):
            for value in entry.values():
                if isinstance(value, str) and value.startswith("btreenode:"):
                    pending.append(value)
                elif isinstance(value, str) and value.startswith("value:"):
                    _check_extent(state_dir, value, sizes)


def _check_extent(state_dir: Path, location: str, sizes: dict[Path, int | None]) -> None:
    """`location` is "<kind>:<base path>:<file path>:<offset>:<length>", as the OCDBT dump writes it; a form
    this check does not know is left to Orbax."""
    try:
        _, rest = location.split(":", 1)
        rest, offset, length = rest.rsplit(":", 2)
        base_path, relative = rest.split(":", 1)
        needed = int(offset) + int(length)
    except ValueError:
        return
    path = state_dir / base_path / relative
    if path not in sizes:
        sizes[path] = path.stat().length if path.is_file() else None
    if sizes[path] is None:
        raise DamagedFiles(f"{path.relative_to(state_dir)} is missing")
    if sizes[path] < needed:
        raise DamagedFiles(f"{path.relative_to(state_dir)} is {sizes[path]} bytes; its data reaches byte {needed}")


def _first_line(error: Exception) -> str:
    """Tensorstore's message without the JSON spec it appends."""
    text = str(error).split(" [tensorstore_spec")[0].strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
