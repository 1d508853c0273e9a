"""Tokenizers: byte-level (no files) and any Hugging Face tokenizer.json; plus training a byte-level BPE."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from jaxscale.data.errors import DataError
from jaxscale.extras import require

# End-of-document tokens of common tokenizers, tried in order when data.eos_token is empty.
COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
TRAINED_EOS_TOKEN = "<|endoftext|>"
VOCAB_MULTIPLE = 128  # matmul-friendly vocabulary sizes on TPU/GPU
# Far above any tokenizer in use (Llama 3: 128,256; Gemma: 262,144); a larger request is a typo, and padding a
# small corpus up to it would take the memory of one special token per id.
MAX_TRAINED_VOCAB = 2 ** 20


class Tokenizer(Protocol):
    vocab_size: int  # real number of token ids, unpadded
    eos_id: int
    fingerprint: str  # changes whenever the mapping text -> ids could

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is the end-of-document token."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "bytes-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library; special tokens are not added, packing adds EOS."""

    def __init__(self, path: str, eos_token: str = ""):
        tokenizers = require("tokenizers", "data", f"data.tokenizer={path}")
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path} does not exist; set data.tokenizer to 'bytes' "
                            "or to a tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise DataError(f"tokenizer file {path} is not a valid Hugging Face tokenizer.json: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else COMMON_EOS_TOKENS
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise DataError(f"tokenizer {path} has no end-of-document token among {candidates}; "
                            "set data.eos_token to the name of the one it uses")
        self.eos_token, self.eos_id = found[0]
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.fingerprint = f"hf-{digest}-{self.eos_token}"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(name: str, eos_token: str = "") -> Tokenizer:
    """"bytes", the path of a tokenizer.json, or "hf:<dir>": the tokenizer.json of a Hugging Face model directory."""
    if name == "bytes":
        return ByteTokenizer()
    if name.startswith("hf:"):
        path = os.path.join(os.path.expanduser(name[3:]), "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer={name}: {path} does not exist; hf:<dir> reads the tokenizer.json that "
                            f"transformers saves with a fast tokenizer")
        return HFTokenizer(path, eos_token)
    return HFTokenizer(os.path.expanduser(name), eos_token)


def train_tokenizer(files_or_source: str | Sequence[str], vocab_size: int, out_path: str, *,
                    text_field: str = "text", text_documents: str = "file", hf_split: str = "train") -> int:
    """Fit a byte-level BPE on text and save it as a tokenizer.json; return its vocabulary size.

    `files_or_source` is a list of text files or one source spec as in DataConfig.source (e.g. "builtin").
    The vocabulary is rounded up to a multiple of 128, padding with unused special tokens when the text is too
    small to learn that many merges. The end-of-document token is "<|endoftext|>".
    """
    from jaxscale.data.config import DataConfig
    from jaxscale.data.sources import iter_documents, resolve_source

    tokenizers = require("tokenizers", "data", "training a tokenizer")
    specs = [files_or_source] if isinstance(files_or_source, str) else list(files_or_source)
    if not specs:
        raise DataError("train_tokenizer got no files; pass text files or a source such as 'builtin'")
    cfg = DataConfig(text_field=text_field, text_documents=text_documents, hf_split=hf_split)
    sources = [resolve_source(spec, cfg) for spec in specs]
    for source in sources:
        if source.kind == "tokens":
            raise DataError(f"{source.spec} holds token ids, not text; train the tokenizer on text files")
    target = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    if target < len(alphabet) + 1:
        raise DataError(f"vocab_size {vocab_size} is smaller than the 256 byte tokens + EOS "
                        "a byte-level BPE needs")
    if vocab_size > MAX_TRAINED_VOCAB:
        raise DataError(f"vocab_size {vocab_size:,} is larger than any tokenizer's (Gemma: 262,144); give at most "
                        f"{MAX_TRAINED_VOCAB:,}")
    out_path = _writable_tokenizer_path(os.path.expanduser(out_path))  # before training, which can take minutes

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=target, special_tokens=[TRAINED_EOS_TOKEN],
                                             initial_alphabet=alphabet, show_progress=False)
    texts = (text for source in sources for text in iter_documents(source, cfg))
    tok.train_from_iterator(texts, trainer=trainer)
    shortfall = target - tok.get_vocab_size(with_added_tokens=True)
    if shortfall > 0:
        tok.add_special_tokens([f"<|unused_{i}|>" for i in range(shortfall)])

    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        tok.save(tmp)
        os.replace(tmp, out_path)  # atomic: a killed run never leaves a truncated tokenizer.json
    except Exception as e:  # the library raises a bare Exception when it cannot write
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"cannot write the tokenizer to {out_path}: {e}") from e
    return tok.get_vocab_size(with_added_tokens=True)


def _writable_tokenizer_path(out_path: str) -> str:
    """`out_path`, with its directory created; refused if it is a directory or a file other than a tokenizer.json
    (a typo must not overwrite the training text or anything else)."""
    if not out_path:
        raise DataError("the tokenizer's output path is empty; give a file such as tokenizer.json")
    if os.path.isdir(out_path):
        raise DataError(f"{out_path} is a directory; give a file path such as "
                        f"{os.path.join(out_path, 'tokenizer.json')}")
    if os.path.exists(out_path):
        with open(out_path, "rb") as f:
            start = f.read(256)
        if not re.match(rb'\s*\{\s*"version"', start):  # how every tokenizer.json the library writes begins
            raise DataError(f"{out_path} exists and is not a tokenizer.json, so it is not overwritten; give another "
                            f"output path, or delete the file first")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the directory of {out_path}: {e}") from e
    return out_path
