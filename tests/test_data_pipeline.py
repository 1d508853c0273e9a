"""Batches: determinism, process slicing, epoch coverage, split hygiene, mixtures, segments, prefetch."""
import threading

import numpy as np
import pytest

from jaxscale.data import DataConfig, DataError, Prefetcher, build_dataset
from jaxscale.data.hashing import text_hash, validation_mask
from jaxscale.data.packing import segment_ids
from jaxscale.data.permutation import permute

SEQ_LEN = 64
EOS = 256  # byte tokenizer


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "data-cache")  # same path in every data test module


@pytest.fixture(scope="session")
def builtin_ds(shared_cache):
    return build_dataset(DataConfig(), SEQ_LEN, cache_dir=shared_cache)


def make_documents(n, alphabet, seed):
    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    return [f"doc {i}: " + " ".join("".join(rng.choice(letters, rng.integers(1, 9)))
                                   for _ in range(rng.integers(5, 80))) for i in range(n)]


def write_documents(directory, docs, prefix="doc"):
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"{prefix}{i:04d}.txt").write_text(doc)
    return str(directory / f"{prefix}*.txt")


def decode_documents(stream):
    """Texts of the documents of a packed stream (each ends with EOS)."""
    stream = np.asarray(stream)
    assert len(stream) == 0 or stream[-1] == EOS
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [bytes(stream[s:e].astype(np.uint8)).decode() for s, e in zip(starts, ends)]


def rows_of_global_range(ds, first_row, n_rows, batch_size, split="train"):
    first_step, last_step = first_row // batch_size, (first_row + n_rows - 1) // batch_size
    steps = range(first_step, last_step + 1)
    rows = np.concatenate([ds.batch(s, batch_size, split=split)["tokens"] for s in steps])
    offset = first_row - first_step * batch_size
    return rows[offset:offset + n_rows]


def test_builtin_corpus_is_real_text_and_large(builtin_ds):
    assert builtin_ds.vocab_size == 257 and builtin_ds.eos_id == EOS
    train = builtin_ds.streams("train")["builtin"]
    assert len(train) > 500_000
    head = np.asarray(train[:200_000])
    text = bytes(head[head < 256].astype(np.uint8)).decode("utf-8")
    assert "statement" in text and " the " in text
    assert len(decode_documents(train)) > 100
    summary = builtin_ds.summary().splitlines()
    assert summary[0].startswith("train") and f"{len(train):,} tokens" in summary[0]
    assert summary[1].startswith("validation") and f"rows of {SEQ_LEN + 1}" in summary[1]


def test_identical_config_gives_identical_batches(builtin_ds, tmp_path):
    again = build_dataset(DataConfig(), SEQ_LEN, cache_dir=str(tmp_path))  # an independent build
    for step in (0, 1, 17, 5000):
        for split in ("train", "validation"):
            a, b = builtin_ds.batch(step, 8, split=split), again.batch(step, 8, split=split)
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def test_global_batch_does_not_depend_on_shard_count(builtin_ds):
    for step in (0, 3, 999):
        whole = builtin_ds.batch(step, 16)
        for count in (2, 4, 8):
            parts = [builtin_ds.batch(step, 16, shard_index=p, shard_count=count) for p in range(count)]
            assert all(part["tokens"].shape == (16 // count, SEQ_LEN + 1) for part in parts)
            for key in ("tokens", "segment_ids"):
                np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_batch_shapes_and_dtypes(builtin_ds):
    batch = builtin_ds.batch(0, 6, shard_index=1, shard_count=3)
    assert set(batch) == {"tokens", "segment_ids"}
    for array in batch.values():
        assert array.dtype == np.int32 and array.shape == (2, SEQ_LEN + 1)
    with pytest.raises(ValueError, match="divide"):
        builtin_ds.batch(0, 6, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="split"):
        builtin_ds.batch(0, 6, split="test")


def test_seed_changes_training_order_but_not_validation(builtin_ds, shared_cache):
    other = build_dataset(DataConfig(seed=1), SEQ_LEN, cache_dir=shared_cache)
    assert not np.array_equal(other.batch(0, 8)["tokens"], builtin_ds.batch(0, 8)["tokens"])
    np.testing.assert_array_equal(other.batch(0, 8, split="validation")["tokens"],
                                  builtin_ds.batch(0, 8, split="validation")["tokens"])


def test_packing_keeps_every_document_once_and_split_never_leaks(tmp_path):
    docs = make_documents(300, "abcdefgh", seed=0)
    cfg = DataConfig(source=write_documents(tmp_path / "docs", docs), validation_fraction=0.2)
    ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    (spec,) = ds.streams("train")
    train_docs = decode_documents(ds.streams("train")[spec])
    validation_docs = decode_documents(ds.streams("validation")[spec])
    assert sorted(train_docs + validation_docs) == sorted(docs)  # every token of every document, exactly once
    assert not set(train_docs) & set(validation_docs)
    assert 30 < len(validation_docs) < 90  # ~20% of 300


def test_every_window_exactly_once_per_epoch_and_epochs_reshuffle(tmp_path):
    docs = make_documents(200, "abcdefgh", seed=1)
    cfg = DataConfig(source=write_documents(tmp_path / "docs", docs), validation_fraction=0.0)
    ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    (stream,) = ds.streams("train").values()
    n = ds.num_windows()
    assert n == len(stream) // (SEQ_LEN + 1) > 50
    windows = np.asarray(stream[: n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1).astype(np.int32)
    expected = sorted(map(bytes, windows))
    batch_size = 7  # does not divide n: epochs begin mid-batch
    epoch0 = rows_of_global_range(ds, 0, n, batch_size)
    epoch1 = rows_of_global_range(ds, n, n, batch_size)
    assert sorted(map(bytes, epoch0)) == expected
    assert sorted(map(bytes, epoch1)) == expected
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, windows)  # shuffled, not in stream order


def test_mixture_weights_are_exact_and_each_source_covers_its_windows(tmp_path):
    letters = write_documents(tmp_path / "letters", make_documents(150, "abcdefgh", seed=2))
    digits = write_documents(tmp_path / "digits", make_documents(150, "0123456789", seed=3))
    cfg = DataConfig(mixture={letters: 3.0, digits: 1.0}, validation_fraction=0.0)
    ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    rows = rows_of_global_range(ds, 0, 4096 * 2, 64)
    # Row content tells the source: digit bytes only occur in the digits corpus (beyond the "doc N:" headers).
    is_digits = np.array([np.isin(row, np.frombuffer(b"0123456789", np.uint8)).mean() > 0.3 for row in rows])
    assert is_digits[:4096].sum() == 1024 and is_digits[4096:].sum() == 1024
    digit_stream = ds.streams("train")[digits]
    n = len(digit_stream) // (SEQ_LEN + 1)
    windows = np.asarray(digit_stream[: n * (SEQ_LEN + 1)]).reshape(n, -1).astype(np.int32)
    assert sorted(map(bytes, rows[is_digits][:n])) == sorted(map(bytes, windows))


def test_segment_ids_count_documents_within_each_row():
    tokens = np.array([[5, 6, EOS, 7, EOS, EOS, 8],
                       [EOS, 1, 2, 3, 4, 5, 6]], dtype=np.int32)
    np.testing.assert_array_equal(segment_ids(tokens, EOS), [[1, 1, 2, 2, 3, 4, 4], [1, 1, 1, 1, 1, 1, 1]])


def test_dataset_segment_ids_follow_eos(builtin_ds):
    batch = builtin_ds.batch(2, 32)
    tokens, segments = batch["tokens"], batch["segment_ids"]
    assert (segments[:, 0] == 1).all()
    steps = np.diff(segments, axis=1)
    np.testing.assert_array_equal(steps, (tokens[:, 1:] == EOS).astype(np.int32))
    assert segments.max() > 1  # the corpus has many documents shorter than a row


def test_prefetcher_resumes_exactly_where_an_uninterrupted_run_is(builtin_ds):
    with Prefetcher(builtin_ds, 0, 8, 0, 1, depth=3) as batches:
        uninterrupted = [next(batches) for _ in range(12)]
    with Prefetcher(builtin_ds, 7, 8, 0, 1, depth=2) as batches:
        resumed = [next(batches) for _ in range(5)]
    assert [step for step, _, _ in uninterrupted] == list(range(12))
    assert [step for step, _, _ in resumed] == list(range(7, 12))
    for (_, expected, _), (_, batch, wait) in zip(uninterrupted[7:], resumed):
        np.testing.assert_array_equal(batch["tokens"], expected["tokens"])
        np.testing.assert_array_equal(batch["segment_ids"], expected["segment_ids"])
        assert wait >= 0.0


def test_prefetcher_per_process_rows_and_synchronous_mode(builtin_ds):
    with Prefetcher(builtin_ds, 4, 8, 1, 2, depth=0) as batches:
        step, batch, wait = next(batches)
    assert step == 4 and wait > 0.0
    np.testing.assert_array_equal(batch["tokens"], builtin_ds.batch(4, 8)["tokens"][4:])


def test_prefetcher_closes_its_thread_and_reraises_loader_errors(tmp_path):
    docs = make_documents(50, "abc", seed=4)
    ds = build_dataset(DataConfig(source=write_documents(tmp_path, docs), validation_fraction=0.0), SEQ_LEN,
                       cache_dir=str(tmp_path / "cache"))
    prefetcher = Prefetcher(ds, 0, 4, depth=2)
    next(prefetcher)
    prefetcher.close()
    assert not any(t.name == "jaxscale-prefetch" for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(prefetcher)
    with (Prefetcher(ds, 0, 4, depth=2, split="validation") as failing,
          pytest.raises(DataError, match="no validation")):
        next(failing)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection_chosen_by_key(n):
    a, b = permute(np.arange(n), n, key=1), permute(np.arange(n), n, key=2)
    np.testing.assert_array_equal(np.sort(a), np.arange(n))
    np.testing.assert_array_equal(permute(np.arange(n)[::-1], n, key=1), a[::-1])  # any positions, any order
    if n >= 64:
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))


def test_mixture_validation_from_every_source_that_can_give_a_row(tmp_path):
    many = write_documents(tmp_path / "many", make_documents(200, "abcdefgh", seed=5))
    # A single document is never split; pick texts whose content hash puts them in the training split.
    book, note = (next(t for t in (f"{stem} {i} " * repeat for i in range(100))
                       if not validation_mask(np.uint64(text_hash(t)), 0.2))
                  for stem, repeat in (("one long file", 400), ("note", 10)))
    (tmp_path / "book.txt").write_text(book)  # held out from the end of its tokens instead
    (tmp_path / "note.txt").write_text(note)  # too short for a row of each split: trains only
    cfg = DataConfig(mixture={many: 1.0, str(tmp_path / "book.txt"): 1.0, str(tmp_path / "note.txt"): 1.0},
                     validation_fraction=0.2)
    with pytest.warns(UserWarning, match=r"note\.txt' has no full validation row"):
        ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    assert sorted(ds.streams("validation")) == sorted([many, str(tmp_path / "book.txt")])
    assert len(ds.streams("train")) == 3
