"""A user's own examples as training batches: any random-access source, or a grain `MapDataset`.

A source has `__len__` and `__getitem__(i)` returning a dict of numpy arrays (grain's RandomAccessDataSource
protocol). Grain shuffles it, afresh each epoch from the seed, and row r of the global batch of step k is
example k x batch_size + r of that endless shuffled stream: a pure function of (seed, k), so resumes, several
processes and elastic restarts see the same batches. Each process reads only its own rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from jaxscale.errors import ConfigError


def _dataset(source: Any, seed: int, what: str):
    import grain

    if not isinstance(source, grain.MapDataset):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise ConfigError(f"{what} must be a random-access source (__len__ and __getitem__(i) returning a "
                              f"dict of arrays) or a grain.MapDataset; got {type(source).__name__}")
        source = grain.MapDataset.source(source)
    if len(source) == 0:
        raise ConfigError(f"{what} is empty")
    return source.shuffle(seed=seed)


class RecordData:
    """Batches of a user's examples, with the interface of the text `Dataset` (`batch`, `has_split`)."""

    def __init__(self, train: Any, validation: Any = None, *, seed: int):
        self.splits = {"train": _dataset(train, seed, "data")}
        if validation is not None:
            self.splits["validation"] = _dataset(validation, seed, "eval_data")
        self.lengths = {name: len(ds) for name, ds in self.splits.items()}
        first = self.splits["train"][0]
        if not isinstance(first, dict) or not first:
            raise ConfigError(f"data[0] is a {type(first).__name__}; each example must be a dict of arrays, e.g. "
                              f"{{'image': ..., 'label': ...}}")

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def batch(self, step: int, batch_size: int, *, split: str = "train", shard_index: int = 0,
              shard_count: int = 1, row_offset: int = 0) -> dict[str, np.ndarray]:
        """This process's rows (block `shard_index` of `shard_count`) of the global batch of `step`, which
        starts at example row_offset + step x batch_size of the shuffled stream."""
        rows = batch_size // shard_count
        first = row_offset + step * batch_size + shard_index * rows
        examples = [self.splits[split][i] for i in range(first, first + rows)]
        return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """The shapes and dtypes of one global batch (the rows of step 0)."""
        return self.batch(0, batch_size)

    def summary(self) -> str:
        return "\n".join(f"  {name}: {count:,} examples (reshuffled every epoch)"
                         for name, count in self.lengths.items())
