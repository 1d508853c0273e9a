"""The dataset the trainer reads: build_dataset() and Dataset.batch(), a pure function of (seed, step, rows).

Global row g of step k is g = k * batch_size + r. The mixture schedule maps g to a source and to that source's
own row counter i; i // windows is the source's epoch and i % windows the position in it, which a seeded
permutation (new each epoch) turns into a window of the source's packed stream. Nothing depends on how many
processes ask: a process whose devices hold block i of n reads rows [i*B/n, (i+1)*B/n) of the same global batch.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from jaxscale.data.cache import TokenStreams, load_or_build, resolve_cache_dir
from jaxscale.data.config import DataConfig
from jaxscale.data.errors import DataError
from jaxscale.data.hashing import key_of
from jaxscale.data.mixture import MixtureSchedule, make_schedule
from jaxscale.data.packing import read_windows, segment_ids, window_count
from jaxscale.data.permutation import permute
from jaxscale.data.preprocess import SPLITS
from jaxscale.data.sources import resolve_source
from jaxscale.data.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger("jaxscale")


@dataclass(frozen=True)
class _SplitData:
    specs: tuple[str, ...]
    streams: tuple[np.ndarray, ...]
    windows: tuple[int, ...]  # full windows per stream
    schedule: MixtureSchedule


class Dataset:
    def __init__(self, tokenizer: Tokenizer, seq_len: int, seed: int, splits: dict[str, _SplitData]):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.seq_len = seq_len
        self.seed = seed
        self._splits = splits

    def has_split(self, split: str) -> bool:
        return split in self._splits

    def num_windows(self, split: str = "train") -> int:
        """Rows in one pass over the split (over all sources of a mixture)."""
        return sum(self._split(split).windows)

    def streams(self, split: str = "train") -> dict[str, np.ndarray]:
        """Each source's packed token stream (documents each followed by EOS), memory-mapped."""
        data = self._split(split)
        return dict(zip(data.specs, data.streams))

    def batch(self, step: int, batch_size: int, *, split: str = "train",
              shard_index: int = 0, shard_count: int = 1, row_offset: int = 0) -> dict[str, np.ndarray]:
        """Rows [shard_index*B/S, (shard_index+1)*B/S) of the global batch of `step`: the batch cut into
        `shard_count` equal blocks of rows, and the block a process's devices hold. The global batch of `step`
        is rows row_offset + step x B onwards of the endless stream (an offset keeps the position exact when a
        resumed run changes the batch size).

        Returns {"tokens", "segment_ids"}, both int32 of shape (B/S, seq_len + 1).
        """
        if step < 0 or batch_size <= 0:
            raise ValueError(f"need step >= 0 and batch_size > 0, got step={step}, batch_size={batch_size}")
        if batch_size % shard_count or not 0 <= shard_index < shard_count:
            raise ValueError(f"batch_size {batch_size} must divide evenly into {shard_count} shards "
                             f"and shard_index {shard_index} must be in [0, {shard_count})")
        data = self._split(split)
        per_shard = batch_size // shard_count
        rows = row_offset + step * batch_size + shard_index * per_shard + np.arange(per_shard, dtype=np.int64)
        source, counter = data.schedule.locate(rows)
        tokens = np.empty((per_shard, self.seq_len + 1), dtype=np.int32)
        for s in np.unique(source):
            picked = source == s
            windows = self._windows(data, int(s), counter[picked], split)
            tokens[picked] = read_windows(data.streams[s], windows, self.seq_len + 1)
        return {"tokens": tokens, "segment_ids": segment_ids(tokens, self.eos_id)}

    def _split(self, split: str) -> _SplitData:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._splits:
            raise DataError("there is no validation data: set data.validation_fraction > 0 "
                            "or data.validation_source")
        return self._splits[split]

    def _windows(self, data: _SplitData, source: int, counter: np.ndarray, split: str) -> np.ndarray:
        n = data.windows[source]
        epoch, position = np.divmod(counter, n)
        windows = np.empty_like(position)
        for e in np.unique(epoch):
            # Validation order ignores the seed, so runs with different seeds evaluate on the same rows.
            key = key_of(self.seed if split == "train" else "-", split, data.specs[source], int(e))
            in_epoch = epoch == e
            windows[in_epoch] = permute(position[in_epoch], n, key)
        return windows

    def summary(self) -> str:
        """One line per split and source: tokens and rows, for the training log."""
        lines = []
        for split, data in self._splits.items():
            for spec, stream, windows in zip(data.specs, data.streams, data.windows):
                lines.append(f"{split:<10} {spec}: {len(stream):,} tokens, "
                             f"{windows:,} rows of {self.seq_len + 1}")
        return "\n".join(lines)


def build_dataset(cfg: DataConfig, seq_len: int, *, cache_dir: str | None = None) -> Dataset:
    """Tokenize (or reuse the cache of) every configured source and return the dataset over them."""
    cfg.validate()
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    cache_dir = resolve_cache_dir(cache_dir)
    row_tokens = seq_len + 1
    fraction = 0.0 if cfg.validation_source else cfg.validation_fraction

    def load(spec: str, validation_fraction: float, setting: str) -> TokenStreams:
        return load_or_build(resolve_source(spec, cfg, setting), tokenizer, cfg, validation_fraction,
                             cache_dir)

    weighted = cfg.weighted_sources()
    setting = "data.mixture" if cfg.mixture else "data.source"
    built = {spec: with_validation_rows(spec, load(spec, fraction, setting), fraction, row_tokens)
             for spec in weighted}
    for spec, streams in built.items():
        if window_count(len(streams.train), row_tokens) == 0:
            meta = streams.meta
            raise DataError(f"data source {spec!r} has {len(streams.train):,} training tokens in "
                            f"{meta['train_documents']} documents ({meta['validation_documents']} more "
                            f"held out for validation), fewer than one row of seq_len + 1 = {row_tokens}; "
                            "add data, lower the sequence length, or for a few large files set "
                            "data.text_documents: paragraph")
    train = {spec: (built[spec].train, weight) for spec, weight in weighted.items()}
    splits = {"train": _split_data(cfg, "train", train, row_tokens)}

    if cfg.validation_source:
        validation = load(cfg.validation_source, 1.0, "data.validation_source").validation
        held_out = {cfg.validation_source: (validation, 1.0)}
    else:
        held_out = {spec: (built[spec].validation, w) for spec, w in weighted.items() if fraction > 0}
    usable = {spec: sw for spec, sw in held_out.items() if window_count(len(sw[0]), row_tokens) > 0}
    if held_out and not usable:
        raise DataError(f"no validation row of {row_tokens} tokens: the held-out documents are too few or "
                        "short. Raise data.validation_fraction, use data.text_documents: paragraph for few "
                        "large files, set data.validation_source, or set data.validation_fraction: 0")
    if usable:
        for spec in (spec for spec in held_out if spec not in usable):
            warnings.warn(f"data source {spec!r} has no full validation row of {row_tokens} tokens; "
                          "validation batches come from the other sources", stacklevel=2)
        splits["validation"] = _split_data(cfg, "validation", usable, row_tokens)
    return Dataset(tokenizer, seq_len, cfg.seed, splits)


def with_validation_rows(spec: str, streams: TokenStreams, fraction: float, row_tokens: int) -> TokenStreams:
    """A source whose held-out documents fill no row (one large file, a few books: documents are held out
    whole) holds out the end of its token stream instead, `fraction` of its training tokens and at least one
    row, as nanoGPT splits a single text file. A source too short for a row of each is left as it is."""
    tail = max(row_tokens, round(fraction * len(streams.train)))
    if not fraction or window_count(len(streams.validation), row_tokens) or len(streams.train) - tail < row_tokens:
        return streams
    log.info("data source %r: its held-out documents fill no row of %d tokens; the last %s of its %s training "
             "tokens are held out instead", spec, row_tokens, f"{tail:,}", f"{len(streams.train):,}")
    return dataclasses.replace(streams, train=streams.train[:-tail], validation=streams.train[-tail:])


def _split_data(cfg: DataConfig, split: str, weighted_streams: dict[str, tuple[np.ndarray, float]],
                row_tokens: int) -> _SplitData:
    specs = tuple(weighted_streams)
    streams = tuple(stream for stream, _ in weighted_streams.values())
    weights = [weight for _, weight in weighted_streams.values()]
    schedule = make_schedule(specs, weights, key_of(cfg.seed if split == "train" else "-", split, "mixture"))
    return _SplitData(specs, streams, tuple(window_count(len(s), row_tokens) for s in streams), schedule)


def check_vocab(ds: Dataset, model_vocab_size: int) -> None:
    """Raise DataError when the model's embedding cannot hold every token id of the dataset's tokenizer."""
    if ds.vocab_size > model_vocab_size:
        padded = -(-ds.vocab_size // 128) * 128
        raise DataError(f"the tokenizer has {ds.vocab_size} token ids but model.vocab_size is "
                        f"{model_vocab_size}; set model.vocab_size to at least {ds.vocab_size} "
                        f"(e.g. {padded}, a multiple of 128)")
