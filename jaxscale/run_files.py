"""The files of a run directory, which is a local directory or a bucket URL (gs://BUCKET/PATH).

Everything jaxscale reads and writes in a run directory goes through `etils.epath` (pathlib's API over the local
disk, and over fsspec's gcsfs for gs://); Orbax writes the checkpoints there itself, through tensorstore. An object
store has no append, no atomic rename and no OS lock, so the places that used them work as follows there:
- JSON-lines files (metrics.jsonl, goodput.jsonl): `LineFile`, which rewrites the whole object;
- folders that a library writes with local file calls (the profiler's trace, TensorBoard's event files):
  `staged_directory`, which has the library write to a local folder and copies it into the run directory;
- the lock on the run directory: a lease object (jaxscale.training.run_lock).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from etils import epath

from jaxscale.errors import ConfigError

# URL scheme -> the fsspec package epath reads and writes it with (tensorstore, under Orbax, has its own driver)
SCHEMES = {"gs": "gcsfs"}
UPLOAD_EVERY_S = 10.0  # GCS takes about one write a second to one object; a LineFile rewrites it less often


def run_path(value: str | os.PathLike, key: str = "run_dir") -> epath.Path:
    """`value` (a directory or a URL) as an epath.Path, or a ConfigError naming the fix for a URL that cannot be
    read here. file:///abs/path is the local directory /abs/path."""
    text = os.fspath(value)
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"{key}={text}: a file:// URL needs an absolute path (file:///abs/path); or give "
                              f"the directory itself")
        return epath.Path(rest)
    if sep:
        if scheme not in SCHEMES:
            raise ConfigError(f"{key}={text}: jaxscale keeps run directories on local disk or in a gs:// bucket, "
                              f"not at {scheme}:// URLs; give gs://BUCKET/PATH, or mount the store and give "
                              f"the mounted directory")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9](/.*)?", rest):
            raise ConfigError(f"{key}={text}: give a bucket and a path, as in {scheme}://BUCKET/PATH")
        package = SCHEMES[scheme]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key}={text}: {scheme}:// needs {package}, which is not installed: "
                              f"pip install 'jaxscale[gcs]'")
        return epath.Path(text)
    cut_short = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):(/?)", text)  # gs:/bucket, gs:bucket, file:/abs
    if cut_short and (cut_short.group(2) or cut_short.group(1) in ("file", *SCHEMES)):
        raise ConfigError(f"{key}={text} looks like a URL with a slash missing; write "
                          f"{cut_short.group(1)}://{text[cut_short.end():]} (or give a directory)")
    return epath.Path(text)


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URL rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: epath.Path) -> epath.Path:
    """A local path made absolute; a URL as it is."""
    return path if is_url(path) else path.absolute()


def ensure_newline(text: str) -> str:
    """`text` ended by a newline if it holds anything: a row a killed run left half written gets ended, so the
    next row starts a line of its own (and readers skip the half-written one)."""
    return text + "\n" if text and not text.endswith("\n") else text


class LineFile:
    """Lines added at the end of a text file of the run directory (metrics.jsonl, goodput.jsonl).

    On a local disk each write is appended and flushed at once. An object in a bucket is written whole, never
    appended to: MaxText uploads each window of metric rows as an object of its own; here the file's whole text
    stays in memory (the object's text read at open, then each write) and the object is rewritten when a write
    asks for it (`now`), when `UPLOAD_EVERY_S` have passed since the last upload, and on close, so readers find
    the one file either way. A process killed in between loses the rows since its last upload, as it loses the
    steps since its last checkpoint."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.remote = is_url(path)
        self.uploaded_at = 0.0
        if self.remote:
            self.text = ensure_newline(path.read_text() if path.exists() else "")
            self.pending = False
            self.file = None
        else:
            self.file = path.open("a")
            if self.file.tell() > 0:
                with path.open("rb") as existing:
                    existing.seek(-1, 2)
                    if existing.read(1) != b"\n":
                        self.file.write("\n")

    def write(self, text: str, now: bool = False) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
            return
        self.text += text
        self.pending = True
        if now or time.monotonic() - self.uploaded_at >= UPLOAD_EVERY_S:
            self.upload()

    def upload(self) -> None:
        if self.remote and self.pending:
            self.path.write_text(self.text)
            self.pending, self.uploaded_at = False, time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.upload()


def upload_tree(local: Path, target: epath.Path) -> None:
    """Copy every file under the local folder `local` to the same relative path under `target`."""
    for root, _, files in os.walk(local):
        for name in files:
            source = Path(root, name)
            destination = target / source.relative_to(local).as_posix()
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read_bytes())


class StagedDirectory:
    """A local folder for a library that writes with local file calls (the profiler, TensorBoard): `target`
    itself where it is local; else a temporary folder whose files `upload` copies to `target` (the profiler
    and TensorBoard can write gs:// themselves only with TensorFlow's or google-cloud-storage's file systems,
    which jaxscale does not install)."""

    def __init__(self, target: epath.Path):
        self.target = target
        self.local = Path(tempfile.mkdtemp(prefix="jaxscale-")) if is_url(target) else Path(target)

    def upload(self, remove: bool = False) -> None:
        """Copy what is in the local folder to `target` (where that is a URL); `remove`: then delete it."""
        if is_url(self.target):
            upload_tree(self.local, self.target)
            if remove:
                shutil.rmtree(self.local, ignore_errors=True)
