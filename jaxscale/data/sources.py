"""Where documents come from: parsing source specs, fingerprinting them, and reading documents or token ids.

A source spec is one string: "builtin"; a path or glob; "hf:<saved dataset dir or hub name>"; or a
path/glob with a format prefix ("text:", "jsonl:", "parquet:", "tokens:", "npy:") that overrides the file
extension. Formats by extension: .jsonl JSON Lines, .parquet Parquet, .bin flat token ids, .npy token ids;
anything else is plain UTF-8 text. A directory holding a dataset written by `datasets.save_to_disk` is read
as a Hugging Face dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob

import numpy as np

from jaxscale.data.builtin_corpus import builtin_document_count, builtin_documents, builtin_fingerprint
from jaxscale.data.config import DataConfig
from jaxscale.data.errors import DataError
from jaxscale.extras import require

FORMAT_PREFIXES = ("text", "jsonl", "parquet", "tokens", "npy", "hf")
EXTENSION_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".bin": "tokens", ".npy": "npy"}
TOKEN_FORMATS = ("tokens", "npy")
HF_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes for DatasetDict / Dataset


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it: used in messages, cache names and shuffle seeds
    kind: str  # "builtin", "hf", "text" (text/jsonl/parquet files) or "tokens" (pre-tokenized files)
    files: tuple[tuple[str, str], ...] = ()  # (format, path); for "hf" one entry with the dataset dir or name


def resolve_source(spec: str, cfg: DataConfig, setting: str = "data.source") -> Source:
    """Parse a spec and find its files; raise DataError, naming `setting` to fix, when nothing is there."""
    if spec == "builtin":
        return Source(spec, "builtin")
    prefix, colon, rest = spec.partition(":")
    forced = prefix if colon and prefix in FORMAT_PREFIXES else None
    path = os.path.expanduser(rest if forced else spec)
    if forced == "hf" and os.path.isdir(path) and not _is_saved_hf_dataset(path):
        raise DataError(f"data source {spec!r}: {path} is a directory, but not a dataset written by Hugging Face "
                        f"datasets' save_to_disk (it holds no {' or '.join(HF_SAVED_MARKERS)}); in {setting} give "
                        f"the directory save_to_disk wrote, or for plain files a glob such as '{path}/**/*.txt'")
    if forced == "hf" or (forced is None and _is_saved_hf_dataset(path)):
        return Source(spec, "hf", (("hf", path),))
    files = tuple((forced or _format_of(p), p) for p in _expand(path, spec, setting))
    kinds = {"tokens" if fmt in TOKEN_FORMATS else "text" for fmt, _ in files}
    if len(kinds) > 1:
        raise DataError(f"{spec!r} matches both token files (.bin/.npy) and text files; "
                        "list them as separate data.mixture entries")
    return Source(spec, kinds.pop(), files)


def _is_saved_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in HF_SAVED_MARKERS)


def _format_of(path: str) -> str:
    return EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower(), "text")


def _expand(path: str, spec: str, setting: str) -> list[str]:
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"data source {spec!r} matches no files (relative to {os.getcwd()}); "
                            f"fix the pattern in {setting}")
        return matches
    if os.path.isdir(path):
        raise DataError(f"data source {path} is a directory; use a glob such as '{path}/**/*.txt' "
                        f"in {setting}")
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist; fix {setting} (relative to {os.getcwd()})")
    return [path]


def source_fingerprint(source: Source, cfg: DataConfig) -> str:
    """Changes whenever the source's content or the settings that shape its documents could change."""
    if source.kind == "builtin":
        return builtin_fingerprint()
    if source.kind == "hf":
        files = [f["filename"] for f in _load_hf(source, cfg).cache_files]
        options = [cfg.text_field, cfg.hf_split]
    else:
        files = [path for _, path in source.files]
        options = [cfg.token_dtype] if source.kind == "tokens" else [cfg.text_field, cfg.text_documents]
    h = hashlib.sha256(json.dumps([source.kind, [fmt for fmt, _ in source.files], options]).encode())
    for path in files:  # path, size and modification time: cheap, and any edit changes them
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


# ----- text documents -----

def document_count_hint(source: Source, cfg: DataConfig) -> int | None:
    """Number of documents when cheap to know (for the progress bar), else None."""
    if source.kind == "builtin":
        return builtin_document_count()
    if source.kind == "hf":
        return len(_load_hf(source, cfg))
    if cfg.text_documents == "file" and all(fmt == "text" for fmt, _ in source.files):
        return len(source.files)
    return None


def iter_documents(source: Source, cfg: DataConfig) -> Iterator[str]:
    """The non-empty text documents of a text source, in a fixed order."""
    if source.kind == "builtin":
        yield from builtin_documents()
    elif source.kind == "hf":
        yield from _read_hf(source, cfg)
    else:
        readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
        for fmt, path in source.files:
            yield from readers[fmt](path, cfg)


def _read_text(path: str, cfg: DataConfig) -> Iterator[str]:
    found = False
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
            if cfg.text_documents == "file":
                text = f.read()
                if text.strip():
                    found = True
                    yield text
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        found = True
                        yield "".join(paragraph).rstrip("\n")
                        paragraph = []
                if paragraph:
                    found = True
                    yield "".join(paragraph).rstrip("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); if it holds token ids, "
                        "name it *.bin or write the source as 'tokens:<path>'") from e
    if not found:
        raise DataError(f"{path} is empty; remove it or narrow the glob in data.source")


def _read_jsonl(path: str, cfg: DataConfig) -> Iterator[str]:
    field, records = cfg.text_field, 0
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                # A byte-order mark (Windows tools write one) may open the file; json.loads rejects it.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                "line); JSON Lines files must be UTF-8: re-encode it (e.g. iconv -f LATIN1 "
                                "-t UTF-8) or remove it from data.source") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                "each line must be one JSON object") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: a {type(record).__name__}, not a JSON object with a "
                                f"{field!r} field")
            if field not in record:
                raise DataError(f"{path}:{lineno}: record has no field {field!r} "
                                f"(its keys: {sorted(record)}); set data.text_field to the field that holds "
                                "the text")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is a {type(text).__name__}, not a string")
            records += 1
            if text:
                yield text
    if not records:
        raise DataError(f"{path} is empty (no JSON records); remove it or narrow the glob in data.source")


def _read_parquet(path: str, cfg: DataConfig) -> Iterator[str]:
    pq = require("pyarrow.parquet", "data", f"reading {path}")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable Parquet"
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    columns = parquet.schema_arrow.names
    if cfg.text_field not in columns:
        raise DataError(f"{path} has no column {cfg.text_field!r} (its columns: {columns}); "
                        "set data.text_field to the column that holds the text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path} is empty (0 rows); remove it or narrow the glob in data.source")
    for batch in parquet.iter_batches(columns=[cfg.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: column {cfg.text_field!r} holds {type(text).__name__}, not strings")
            if text:
                yield text


def _load_hf(source: Source, cfg: DataConfig):
    loaded, _ = load_hf_dataset(source.files[0][1], cfg.hf_split, f"data source {source.spec!r}")
    if cfg.text_field not in loaded.column_names:
        raise DataError(f"Hugging Face dataset {source.files[0][1]} has no column {cfg.text_field!r} "
                        f"(its columns: {loaded.column_names}); set data.text_field")
    return loaded


def load_hf_dataset(location: str, split: str, purpose: str, split_setting: str = "data.hf_split"):
    """(dataset, its name for messages) of a directory written by `save_to_disk` or a hub name, taking `split`
    of a DatasetDict (a hub name is always read by split); `purpose` says what it is for, should `datasets` be
    missing, and `split_setting` is the setting to fix when the split is not there."""
    datasets = require("datasets", "hf", purpose)
    if os.path.isdir(location):
        try:
            loaded = datasets.load_from_disk(location)
        except Exception as e:  # a damaged save raises whatever its first unreadable file does
            raise DataError(f"cannot read the Hugging Face dataset saved in {location}: {type(e).__name__}: "
                            f"{str(e).rstrip('.')}; "
                            f"write it again with save_to_disk") from e
    else:  # a hub name: read from the local datasets cache (set HF_HUB_OFFLINE=1 to forbid downloads)
        try:
            return datasets.load_dataset(location, split=split), f"{location} split {split!r}"
        except Exception as e:  # network, missing cache and bad names raise many exception types
            raise DataError(f"cannot load Hugging Face dataset {location!r} split {split!r}: {e}"
                            ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{location} has splits {sorted(loaded)}, not {split!r}; "
                            f"set {split_setting}")
        return loaded[split], f"{location} split {split!r}"
    return loaded, location


def _read_hf(source: Source, cfg: DataConfig) -> Iterator[str]:
    loaded = _load_hf(source, cfg)
    if len(loaded) == 0:
        raise DataError(f"Hugging Face dataset {source.files[0][1]} split {cfg.hf_split!r} is empty")
    for batch in loaded.select_columns([cfg.text_field]).iter(batch_size=1024):
        yield from (text for text in batch[cfg.text_field] if text)


# ----- pre-tokenized files -----

def open_token_file(fmt: str, path: str, cfg: DataConfig) -> np.ndarray:
    """A read-only memory map of a flat array of token ids; raise DataError on a malformed file."""
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path} is empty; remove it or narrow the glob in data.source")
    if fmt == "npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path} is not a readable .npy array ({e}); save token ids with numpy.save"
                            ) from e
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise DataError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}; it must be a flat "
                            "integer array of token ids (documents separated by the EOS id)")
        if tokens.size == 0:
            raise DataError(f"{path} is empty (0 tokens); remove it or narrow the glob in data.source")
        return tokens
    dtype = np.dtype(cfg.token_dtype)
    if size % dtype.itemsize:
        raise DataError(f"{path} is {size} bytes, not a multiple of {dtype.itemsize} as data.token_dtype="
                        f"{cfg.token_dtype} needs; the file is truncated or holds another element type")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    _reject_uint32_as_uint16(tokens, path)
    return tokens


def _reject_uint32_as_uint16(tokens: np.ndarray, path: str) -> None:
    # Little-endian uint32 ids below 65536 read as uint16 leave every second value 0, which the vocab check
    # cannot catch because all values look small.
    if tokens.dtype != np.uint16:
        return
    sample = np.asarray(tokens[:8192])
    if sample.size >= 32 and not sample[1::2].any() and sample[0::2].any():
        raise DataError(f"{path} looks like uint32 token ids (every second uint16 value is 0); "
                        "set data.token_dtype: uint32")
