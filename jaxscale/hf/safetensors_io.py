"""Reading and writing the safetensors files of a Hugging Face model directory.

Reading memory-maps each file (safetensors' own reader) and returns only the slices asked for. Writing streams
one tensor at a time into shards of at most `MAX_SHARD_BYTES` (transformers' split, with its index file), so
exporting a model never holds more than one of its tensors in host memory (safetensors' own writer takes them
all at once).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxscale.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10 ** 9  # transformers' default max_shard_size, "5GB"
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
INSTALL_HINT = "pip install safetensors  (or: pip install 'jaxscale[hf]')"


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError(f"reading Hugging Face checkpoints needs the `safetensors` library: {INSTALL_HINT}") from e
    return safe_open


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it: from the index of a sharded checkpoint, else from model.safetensors."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{index_path} is not a safetensors index (a JSON object with a weight_map): "
                              f"{type(e).__name__}: {e}") from e
        files = {name: directory / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConfigError(f"{index_path} names {path.name}, which does not exist: the download is "
                                  f"incomplete; fetch the missing shards")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        torch_only = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = (f" (it holds {', '.join(sorted(torch_only))}: PyTorch pickles, which jaxscale does not read; save "
                f"the model again with save_pretrained, which writes safetensors)" if torch_only else "")
        raise ConfigError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    return {name: single for name in _open_file(single, _safe_open()).keys()}


def _open_file(path: Path, safe_open):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error type for damaged headers and short files
        raise ConfigError(f"{path} is not a readable safetensors file ({e}); it may be truncated or still "
                          f"downloading: fetch it again") from e


class CheckpointReader:
    """The tensors of one HF model directory, memory-mapped; use as a context manager."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = weight_files(directory)
        self._stack = contextlib.ExitStack()
        safe_open = _safe_open()
        self._handles = {path: self._stack.enter_context(_open_file(path, safe_open))
                         for path in sorted(set(self.files.values()))}
        for path, handle in self._handles.items():
            missing = [name for name, where in self.files.items() if where == path and name not in handle.keys()]
            if missing:
                raise ConfigError(f"{self.directory / INDEX_FILE} places {missing[0]} in {path.name}, which does "
                                  f"not hold it: the index and the shards disagree; fetch them again")

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._slice(name)[slices])

    def _slice(self, name: str):
        return self._handles[self.files[name]].get_slice(name)


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names (in order) grouped into files of at most `max_bytes` (a larger tensor gets a file alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_checkpoint(directory: Path, tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
                     produce: Callable[[str], np.ndarray], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write `tensors` (name -> shape, dtype, in file order) as transformers does: model.safetensors, or
    model-0000k-of-0000n.safetensors and model.safetensors.index.json. `produce(name)` gives each tensor's
    values when its turn comes."""
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in tensors.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for k in range(len(shards))]
    for file_name, shard in zip(names, shards):
        header, offset = {}, 0
        for name in shard:
            shape, dtype = tensors[name]
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(directory / file_name, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in shard:
                array = np.ascontiguousarray(produce(name))
                shape, dtype = tensors[name]
                if array.shape != tuple(shape) or array.dtype != dtype:
                    raise ValueError(f"{name}: produced {array.shape} {array.dtype}, expected {shape} {dtype}")
                f.write(array.reshape(-1).view(np.uint8).data)
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, shard in zip(names, shards) for name in shard}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]
