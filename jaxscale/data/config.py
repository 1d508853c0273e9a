"""Data settings: what to read, how to tokenize it, how to split and shuffle it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxscale.data.errors import DataError

TEXT_DOCUMENT_UNITS = ("file", "paragraph")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class DataConfig:
    # Where the training text comes from: "builtin" (documentation text shipped with CPython, no download),
    # a file path or glob (*.txt/*.md/... text, *.jsonl, *.parquet, *.bin flat token ids, *.npy token ids),
    # "hf:<saved dataset dir or cached hub name>", or a path/glob with a format prefix that overrides the
    # file extension: "text:", "jsonl:", "parquet:", "tokens:", "npy:".
    source: str = "builtin"
    # Several sources with sampling weights, e.g. {"builtin": 0.2, "data/*.jsonl": 0.8}. When non-empty it is
    # used instead of `source`. Weights need not sum to one.
    mixture: dict[str, float] = field(default_factory=dict)
    # Optional separate validation data (same syntax as `source`, e.g. nanoGPT's val.bin). When set, the
    # training sources are not split and `validation_fraction` is ignored.
    validation_source: str = ""
    # "bytes" (256 byte values + EOS, no files), a path to a Hugging Face tokenizer.json, or "hf:<dir>": the
    # tokenizer.json of a Hugging Face model directory.
    tokenizer: str = "bytes"
    # End-of-document token of a tokenizer.json; empty picks the first present of the usual names.
    eos_token: str = ""
    # Seeds the shuffle of training rows; not the train/validation split, so validation agrees across seeds.
    seed: int = 0
    # Fraction of documents, chosen by a hash of their content, held out for validation.
    validation_fraction: float = 0.05
    # Whether attention should stay within a document (segment ids); the model reads this flag.
    document_masking: bool = True
    # Field holding the text in JSON Lines records, Parquet columns and Hugging Face datasets.
    text_field: str = "text"
    # How plain text files divide into documents: one per "file", or one per blank-line separated "paragraph".
    text_documents: str = "file"
    # Element type of flat binary token files (*.bin), as nanoGPT writes them.
    token_dtype: str = "uint16"
    # Split of a Hugging Face dataset to read.
    hf_split: str = "train"
    # Batches prepared ahead by the background loader thread; 0 loads each batch when asked.
    prefetch: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DataError naming the setting when a value is out of range."""
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.text_documents not in TEXT_DOCUMENT_UNITS:
            raise DataError(f"data.text_documents must be one of {TEXT_DOCUMENT_UNITS}, "
                            f"got {self.text_documents!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise DataError(f"data.token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        if self.prefetch < 0:
            raise DataError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if not self.mixture and not self.source:
            raise DataError("data.source is empty; set it (e.g. 'builtin') or set data.mixture")
        for spec, weight in self.mixture.items():
            # math.isfinite: an infinite weight makes every share inf/inf = nan in the schedule
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0
                    or not math.isfinite(weight)):
                raise DataError(f"data.mixture weight of {spec!r} must be >= 0 and finite, got {weight}")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise DataError("data.mixture weights sum to zero; give at least one source a positive weight")

    def weighted_sources(self) -> dict[str, float]:
        """Training sources and their weights, in a fixed order (sorted) so YAML key order does not matter."""
        if not self.mixture:
            return {self.source: 1.0}
        return {spec: float(self.mixture[spec]) for spec in sorted(self.mixture) if self.mixture[spec] > 0}
