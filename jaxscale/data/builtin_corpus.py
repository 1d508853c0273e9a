"""The default corpus: English documentation text shipped inside every CPython, so training needs no download.

Two parts, one document each entry:
  * `pydoc_data.topics`: the language reference topics that `help()` shows (~0.5 MB);
  * the docstrings of the pure-Python standard library modules, one document per module (~1.5 MB).
Together about two million byte tokens. The text depends on the Python version, so the fingerprint hashes it.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

# Test suites, the IDLE editor and installed packages are not standard library documentation.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds strip it; the docstrings remain
        return {}
    return topics


def _stdlib_modules() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        paths += [os.path.join(directory, f) for f in sorted(files) if f.endswith(".py")]
    return paths


def _module_docstrings(path: str, stdlib_root: str) -> str:
    """All docstrings of one module, each under the dotted name it documents."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, OSError):  # a few stdlib files are templates or Python-2 only
        return ""
    module = os.path.relpath(path, stdlib_root)[: -len(".py")].replace(os.sep, ".")
    parts = []

    def visit(node: ast.AST, name: str) -> None:
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{name}\n{doc}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{name}.{child.name}")

    visit(tree, module)
    return "\n\n".join(parts)


def builtin_documents() -> Iterator[str]:
    """The documents of the built-in corpus, in a fixed order."""
    topics = _topics()
    for key in sorted(topics):
        yield topics[key]
    yield from _stdlib_docstrings()


@functools.cache  # parsing takes seconds; a process that tokenizes twice (two tokenizers) parses once
def _stdlib_docstrings() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    return tuple(text for text in (_module_docstrings(path, root) for path in _stdlib_modules()) if text)


def builtin_document_count() -> int:
    """An upper bound on the number of documents, for the progress bar."""
    return len(_topics()) + len(_stdlib_modules())


def builtin_fingerprint() -> str:
    """Changes whenever the corpus text could: topics content, Python version, and the stdlib files' stats."""
    h = hashlib.sha256(sys.version.encode())
    topics = _topics()
    for key in sorted(topics):
        h.update(key.encode())
        h.update(topics[key].encode())
    for path in _stdlib_modules():
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()
