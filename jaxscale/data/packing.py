"""Training rows from a packed token stream.

A source's stream is its documents back to back, each followed by EOS. Rows are the stream's
consecutive, non-overlapping windows of seq_len + 1 tokens (inputs tokens[:-1], targets tokens[1:]); the
tail shorter than a window is unused. Over an epoch every window is used once, so every token in it is
seen exactly once.
"""
from __future__ import annotations

import numpy as np


def window_count(stream_tokens: int, row_tokens: int) -> int:
    return stream_tokens // row_tokens


def read_windows(stream: np.ndarray, windows: np.ndarray, row_tokens: int) -> np.ndarray:
    """Rows `windows` of the stream as an int32 array (len(windows), row_tokens); reads only those bytes."""
    rows = np.empty((len(windows), row_tokens), dtype=np.int32)
    for i, w in enumerate(windows.tolist()):
        rows[i] = stream[w * row_tokens:(w + 1) * row_tokens]
    return rows


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """1-based document number of each token within its row.

    An EOS token starts a new segment: it is the separator that opens the next document, so that document's
    tokens can attend to it like a BOS token while nothing attends across the boundary. (The last token of a
    document still has EOS as its target, so the model learns where documents end.)
    """
    is_eos = tokens == eos_id
    return (np.cumsum(is_eos, axis=1, dtype=np.int32) + 1 - is_eos[:, :1]).astype(np.int32)
