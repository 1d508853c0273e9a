"""Data pipeline: sources -> tokenize and cache -> pack into rows -> stateless shuffled batches.

    ds = build_dataset(DataConfig(), seq_len=256)
    ds.batch(step, global_batch, shard_index=i, shard_count=n)  # block i of n equal blocks of rows
"""
from jaxscale.data.config import DataConfig
from jaxscale.data.dataset import Dataset, build_dataset, check_vocab
from jaxscale.data.errors import DataError
from jaxscale.data.prefetch import Prefetcher
from jaxscale.data.tokenizers import load_tokenizer, train_tokenizer

__all__ = ["DataConfig", "DataError", "Dataset", "Prefetcher", "build_dataset", "check_vocab",
           "load_tokenizer", "train_tokenizer"]
