"""Tokenize a source once and write its train and validation token streams.

Each stream is the concatenation of its documents, each followed by the EOS token (nanoGPT's layout).
A document goes to validation when a hash of its content falls in the lowest `validation_fraction` of the
hash range, so the split never cuts a document and identical documents always land on the same side.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tqdm import tqdm

from jaxscale.data.config import DataConfig
from jaxscale.data.errors import DataError
from jaxscale.data.hashing import mix64, text_hash, validation_mask
from jaxscale.data.sources import Source, document_count_hint, iter_documents, open_token_file
from jaxscale.data.tokenizers import Tokenizer

SPLITS = ("train", "validation")
CHUNK_TOKENS = 1 << 22  # pre-tokenized files are processed in pieces of this many tokens to bound memory
ENCODE_BATCH_DOCUMENTS = 256


def stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _StreamWriter:
    """Appends token ids to one split's stream file and counts what it wrote."""

    def __init__(self, path: str, dtype: np.dtype):
        self.dtype = dtype
        self.tokens = self.documents = 0
        self._file = open(path, "wb")  # noqa: SIM115 -- closed by close(), which write_splits always calls

    def write(self, ids: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # the cache directory is renamed into place next; data must be on disk
        self._file.close()


def write_splits(source: Source, tokenizer: Tokenizer, cfg: DataConfig, validation_fraction: float,
                 out_dir: str) -> dict[str, int]:
    """Write out_dir/{train,validation}.bin; return token and document counts per split."""
    dtype = stream_dtype(tokenizer.vocab_size)
    writers = {split: _StreamWriter(os.path.join(out_dir, f"{split}.bin"), dtype) for split in SPLITS}
    try:
        if source.kind == "tokens":
            for fmt, path in source.files:
                tokens = open_token_file(fmt, path, cfg)
                if fmt == "tokens" and tokens.dtype == np.uint16 and tokenizer.vocab_size > 1 << 16:
                    # uint32 ids read as uint16 are all below 65536, so the vocabulary check passes them
                    raise DataError(f"{path} is read as uint16 (data.token_dtype), which cannot hold the ids "
                                    f"of a vocabulary of {tokenizer.vocab_size}; set data.token_dtype: uint32")
                _split_token_file(tokens, path, tokenizer, validation_fraction, writers)
        else:
            _split_text_documents(source, tokenizer, cfg, validation_fraction, writers)
    finally:
        for writer in writers.values():
            writer.close()
    counts = {}
    for split, writer in writers.items():
        counts[f"{split}_tokens"], counts[f"{split}_documents"] = writer.tokens, writer.documents
    return counts


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch


def _split_text_documents(source: Source, tokenizer: Tokenizer, cfg: DataConfig, fraction: float,
                          writers: dict[str, _StreamWriter]) -> None:
    eos = np.array([tokenizer.eos_id])
    total = document_count_hint(source, cfg)
    with tqdm(total=total, unit="doc", desc=f"tokenizing {source.spec}") as progress:
        for texts in _batched(iter_documents(source, cfg), ENCODE_BATCH_DOCUMENTS):
            held_out = validation_mask(np.array([text_hash(t) for t in texts], dtype=np.uint64), fraction)
            for ids, is_validation in zip(tokenizer.encode_batch(texts), held_out):
                writer = writers["validation" if is_validation else "train"]
                writer.write(ids)
                writer.write(eos)
                writer.documents += 1
            progress.update(len(texts))
        progress.total = progress.n  # the document count was an estimate; end the bar at 100%


@dataclass(frozen=True)
class _Documents:
    ends: np.ndarray  # index of each document's last token (its EOS, or the file's last token)
    hashes: np.ndarray  # uint64 content hash of each document
    missing_final_eos: bool  # the file's last document has no EOS; packing appends one


def _split_token_file(tokens: np.ndarray, path: str, tokenizer: Tokenizer, fraction: float,
                      writers: dict[str, _StreamWriter]) -> None:
    # Two passes so memory stays bounded for any file size: find documents and hash them, then copy each
    # document's tokens into its split.
    docs = _scan_token_documents(tokens, path, tokenizer)
    held_out = validation_mask(docs.hashes, fraction)
    starts = np.concatenate(([0], docs.ends[:-1] + 1))
    with tqdm(total=len(tokens), unit="tok", unit_scale=True, desc=f"splitting {path}") as progress:
        for offset in range(0, len(tokens), CHUNK_TOKENS):
            chunk = np.asarray(tokens[offset:offset + CHUNK_TOKENS])
            end = offset + len(chunk)
            first, last = np.searchsorted(docs.ends, [offset, end - 1])
            lengths = (np.minimum(docs.ends[first:last + 1] + 1, end)
                       - np.maximum(starts[first:last + 1], offset))
            token_held_out = np.repeat(held_out[first:last + 1], lengths)
            writers["train"].write(chunk[~token_held_out])
            writers["validation"].write(chunk[token_held_out])
            progress.update(len(chunk))
    if docs.missing_final_eos:
        writers["validation" if held_out[-1] else "train"].write(np.array([tokenizer.eos_id]))
    writers["validation"].documents += int(held_out.sum())
    writers["train"].documents += int((~held_out).sum())


def _scan_token_documents(tokens: np.ndarray, path: str, tokenizer: Tokenizer) -> _Documents:
    """Find document ends (EOS positions) and hash each document, chunk by chunk.

    The hash mixes a document's length and the sum and sum of squares of its ids: sums carry over chunk
    boundaries, cost two passes of arithmetic per token, and identical documents still hash alike.
    """
    eos = tokenizer.eos_id
    ends, hashes = [], []
    doc_start, carried = 0, np.zeros(2, dtype=np.uint64)  # the document running over the chunk boundary
    with tqdm(total=len(tokens), unit="tok", unit_scale=True, desc=f"indexing {path}") as progress:
        for offset in range(0, len(tokens), CHUNK_TOKENS):
            chunk = np.asarray(tokens[offset:offset + CHUNK_TOKENS])
            _check_token_ids(chunk, offset, path, tokenizer)
            local_ends = np.flatnonzero(chunk == eos)
            boundaries = np.concatenate(([0], local_ends + 1))
            boundaries = boundaries[boundaries < len(chunk)]
            ids = chunk.astype(np.uint64)
            sums = np.stack([np.add.reduceat(ids, boundaries), np.add.reduceat(ids * ids, boundaries)],
                            axis=1)
            sums[0] += carried  # uint64 arithmetic wraps modulo 2**64, as a hash should
            if len(local_ends):
                doc_ends = offset + local_ends
                lengths = doc_ends + 1 - np.concatenate(([doc_start], doc_ends[:-1] + 1))
                ends.append(doc_ends)
                hashes.append(_document_hash(lengths, sums[:len(local_ends)]))
                doc_start = int(doc_ends[-1]) + 1
            carried = sums[len(local_ends)] if len(sums) > len(local_ends) else np.zeros(2, dtype=np.uint64)
            progress.update(len(chunk))
    missing_final_eos = doc_start < len(tokens)
    if missing_final_eos:
        ends.append(np.array([len(tokens) - 1]))
        hashes.append(_document_hash(np.array([len(tokens) - doc_start]), carried[None]))
    return _Documents(np.concatenate(ends).astype(np.int64), np.concatenate(hashes), missing_final_eos)


def _document_hash(lengths: np.ndarray, sums: np.ndarray) -> np.ndarray:
    return mix64(mix64(mix64(lengths.astype(np.uint64)) ^ sums[:, 0]) ^ sums[:, 1])


def _check_token_ids(chunk: np.ndarray, offset: int, path: str, tokenizer: Tokenizer) -> None:
    bad = np.flatnonzero((chunk >= tokenizer.vocab_size) | (chunk < 0))
    if bad.size:
        position, value = offset + int(bad[0]), int(chunk[bad[0]])
        raise DataError(f"{path} has token id {value} at position {position}, outside the tokenizer's "
                        f"vocabulary of {tokenizer.vocab_size}; set data.tokenizer to the tokenizer the file "
                        "was made with (or data.token_dtype, if the element type is wrong)")
