"""A JSON Lines corpus of the Python source files on this machine, for training without network access.

One record {"text": <file contents>} per file: the standard library and site-packages of the Python running
this script (sysconfig paths), plus any directories given. Files that are empty or not UTF-8 are skipped, and
files with identical contents are written once. The order is sorted by path, so the same machine gives the same
corpus. With byte tokens (data.tokenizer: bytes) every UTF-8 byte of text is one token: the GPU scaling sweep
(experiments/scaling_gpu.sh) needs at least 100M of them.

Usage:
    python experiments/code_corpus.py OUT.jsonl [EXTRA_DIR ...] [--max-bytes 200e6] [--no-python-paths]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def python_paths() -> list[Path]:
    """The standard library and site-packages directories of this Python, each once."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[key]) for key in ("stdlib", "purelib", "platlib") if key in paths))


def python_files(dirs: list[Path]) -> list[Path]:
    """Every *.py file under `dirs`, each once (directories may nest, e.g. site-packages inside the stdlib
    directory), sorted by path."""
    found: set[Path] = set()
    for root in dirs:
        if not root.is_dir():
            continue
        for parent, subdirs, files in os.walk(root):  # symlinked directories are not followed: no cycles
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            found.update(Path(parent, f).resolve() for f in files if f.endswith(".py"))
    return sorted(p for p in found if p.is_file())


def unique_texts(files: list[Path], max_bytes: float) -> Iterator[str]:
    """The non-empty UTF-8 contents of `files` in order, identical contents once, until the next one would make
    the total UTF-8 size exceed `max_bytes`."""
    seen: set[bytes] = set()
    total = 0
    for path in files:
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):  # unreadable or another encoding: not worth guessing
            continue
        digest = hashlib.sha256(data).digest()
        if not text.strip() or digest in seen:
            continue
        if total + len(data) > max_bytes:
            return
        seen.add(digest)
        total += len(data)
        yield text


def write_corpus(out: Path, files: list[Path], max_bytes: float) -> tuple[int, int]:
    """Write the corpus to `out` (complete or not at all: a temporary file renamed into place), and return
    (records, UTF-8 bytes of text)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    records = text_bytes = 0
    with tmp.open("w", encoding="utf-8") as f:
        for text in unique_texts(files, max_bytes):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            records += 1
            text_bytes += len(text.encode("utf-8"))
    os.replace(tmp, out)
    return records, text_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSON Lines file to write")
    parser.add_argument("dirs", nargs="*", type=Path, help="more directories to read *.py files from")
    parser.add_argument("--max-bytes", type=float, default=float("inf"),
                        help="stop before the text exceeds this many UTF-8 bytes (byte tokens)")
    parser.add_argument("--no-python-paths", action="store_true",
                        help="read only the directories given, not this Python's stdlib and site-packages")
    args = parser.parse_args(argv)
    dirs = [*([] if args.no_python_paths else python_paths()), *args.dirs]
    if not dirs:
        parser.error("no directories to read: give some, or drop --no-python-paths")
    files = python_files(dirs)
    records, text_bytes = write_corpus(args.out, files, args.max_bytes)
    print(f"{args.out}: {records:,} files ({len(files):,} found, empty, non-UTF-8 and duplicates skipped), "
          f"{text_bytes:,} bytes of text ({text_bytes / 1e6:,.1f}M byte tokens), from "
          f"{', '.join(map(str, dirs))}")
    if not records:
        print("error: no usable .py files found; give directories that hold some", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
