"""Notes of what code chose while it was traced, for reports and checks: the code notes what it ran
(`note("attention", "cudnn")`), and whoever traces it collects the notes of one kind (`recording`).

Notes only record: nothing reads them to choose what to run, since every such choice comes in as an argument.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_RECORDINGS: contextvars.ContextVar[tuple[tuple[str, list[str]], ...]] = contextvars.ContextVar(
    "jaxscale_trace_notes", default=())


@contextlib.contextmanager
def recording(kind: str) -> Iterator[list[str]]:
    """The names noted under `kind` while code is traced inside this block, in order. Blocks nest, and every
    open block of that kind gets each note."""
    names: list[str] = []
    token = _RECORDINGS.set((*_RECORDINGS.get(), (kind, names)))
    try:
        yield names
    finally:
        _RECORDINGS.reset(token)


def note(kind: str, name: str) -> None:
    for recorded, names in _RECORDINGS.get():
        if recorded == kind:
            names.append(name)
