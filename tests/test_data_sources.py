"""Every source format reads back its documents; the cache is reused, rebuilt on change, never half-used."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxscale.data import DataConfig, DataError, build_dataset
from jaxscale.data.cache import resolve_cache_dir

SEQ_LEN = 32
EOS = 256
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [f"Document {i}.\nIt says {'hello ' * (i % 7 + 1)}and counts to {i * 37}." for i in range(120)]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "data-cache")  # same path in every data test module


def byte_tokens(docs, final_eos=True):
    ids = []
    for doc in docs:
        ids += list(doc.encode()) + [EOS]
    return np.array(ids if final_eos else ids[:-1])


def all_documents(ds):
    """Decoded documents of the train and validation streams of a single-source dataset."""
    docs = []
    for split in ("train", "validation"):
        (stream,) = ds.streams(split).values()
        stream = np.asarray(stream)
        ends = np.flatnonzero(stream == EOS)
        starts = np.concatenate(([0], ends[:-1] + 1))
        docs += [bytes(stream[s:e].astype(np.uint8)).decode() for s, e in zip(starts, ends)]
    return docs


def write_text_per_file(d):
    for i, doc in enumerate(DOCS):
        (d / f"{i:03d}.txt").write_text(doc)
    return {"source": str(d / "*.txt")}


def write_paragraphs(d):
    (d / "all.md").write_text("\n\n\n".join(DOCS) + "\n")
    return {"source": str(d / "all.md"), "text_documents": "paragraph"}


def write_jsonl(d):
    with open(d / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"body": doc, "id": 1}) + "\n\n" for doc in DOCS[:60])  # blank lines too
    with open(d / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"body": doc}) + "\n" for doc in DOCS[60:])
    return {"source": str(d / "*.jsonl"), "text_field": "body"}


def write_windows_text(d):
    # Notepad-style: a UTF-8 byte-order mark and CRLF line ends; both read as the plain text
    for i, doc in enumerate(DOCS):
        (d / f"{i:03d}.txt").write_bytes(b"\xef\xbb\xbf" + doc.replace("\n", "\r\n").encode())
    return {"source": str(d / "*.txt")}


def write_windows_jsonl(d):
    lines = "".join(json.dumps({"text": doc}) + "\r\n" for doc in DOCS)
    (d / "docs.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    return {"source": str(d / "docs.jsonl")}


def write_parquet(d):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table, d / "docs.parquet", row_group_size=50)
    return {"source": str(d / "docs.parquet"), "text_field": "content"}


def write_npy(d):
    np.save(d / "tokens.npy", byte_tokens(DOCS, final_eos=False).astype(np.int32))  # the last EOS is added
    return {"source": str(d / "tokens.npy")}


def write_bin_uint16(d):
    byte_tokens(DOCS[:70]).astype(np.uint16).tofile(d / "part0.bin")
    byte_tokens(DOCS[70:]).astype(np.uint16).tofile(d / "part1.bin")
    return {"source": str(d / "part*.bin")}


def write_bin_uint32(d):
    byte_tokens(DOCS).astype(np.uint32).tofile(d / "train.dat")
    return {"source": f"tokens:{d / 'train.dat'}", "token_dtype": "uint32"}


def write_hf_saved(d):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(d / "hf"))
    return {"source": str(d / "hf")}


@pytest.mark.parametrize("write", [write_text_per_file, write_paragraphs, write_jsonl, write_windows_text,
                                   write_windows_jsonl, write_parquet, write_npy, write_bin_uint16,
                                   write_bin_uint32, write_hf_saved])
def test_each_format_yields_its_documents(write, tmp_path):
    (tmp_path / "data").mkdir()
    cfg = DataConfig(validation_fraction=0.25, **write(tmp_path / "data"))
    ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    assert sorted(all_documents(ds)) == sorted(DOCS)
    (validation,) = ds.streams("validation").values()
    assert 0 < len(validation) < len(byte_tokens(DOCS)) / 2
    assert ds.batch(0, 4)["tokens"].shape == (4, SEQ_LEN + 1)


def test_validation_source_replaces_the_split(tmp_path):
    train = write_text_per_file(tmp_path)["source"]
    byte_tokens(DOCS[:40]).astype(np.uint16).tofile(tmp_path / "val.bin")
    cfg = DataConfig(source=train, validation_source=str(tmp_path / "val.bin"), validation_fraction=0.3)
    ds = build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(ds.streams("train")[train], byte_tokens(DOCS))  # nothing held out
    np.testing.assert_array_equal(ds.streams("validation")[str(tmp_path / "val.bin")], byte_tokens(DOCS[:40]))


def cache_entries(cache_dir):
    return sorted(os.listdir(cache_dir))


def test_second_build_reuses_the_cache_and_a_changed_source_rebuilds(tmp_path):
    (tmp_path / "docs").mkdir()
    source = write_text_per_file(tmp_path / "docs")["source"]
    cache = tmp_path / "cache"
    first = build_dataset(DataConfig(source=source), SEQ_LEN, cache_dir=str(cache))
    (entry,) = cache_entries(cache)
    train_file = cache / entry / "train.bin"
    built_at = train_file.stat().st_mtime_ns

    second = build_dataset(DataConfig(source=source), SEQ_LEN, cache_dir=str(cache))
    assert cache_entries(cache) == [entry] and train_file.stat().st_mtime_ns == built_at
    np.testing.assert_array_equal(second.batch(3, 4)["tokens"], first.batch(3, 4)["tokens"])

    time.sleep(0.01)
    (tmp_path / "docs" / "000.txt").write_text("A changed first document, longer than before.")
    changed = build_dataset(DataConfig(source=source), SEQ_LEN, cache_dir=str(cache))
    assert len(cache_entries(cache)) == 2
    assert "A changed first document, longer than before." in all_documents(changed)
    assert DOCS[0] not in all_documents(changed)

    build_dataset(DataConfig(source=source, validation_fraction=0.5), SEQ_LEN, cache_dir=str(cache))
    assert len(cache_entries(cache)) == 3  # the split is part of the key too


CACHE_DAMAGE = {
    "meta.json deleted": lambda d: (d / "meta.json").unlink(),
    "meta.json garbled": lambda d: (d / "meta.json").write_text('{"format": 1, "ke'),
    "meta.json not UTF-8": lambda d: (d / "meta.json").write_bytes(b"\xff\xfe{}"),
    "meta.json of another cache": lambda d: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace('"key": "', '"key": "0')),
    "train.bin truncated": lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-3]),
    "validation.bin deleted": lambda d: (d / "validation.bin").unlink(),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, damage, caplog):
    (tmp_path / "docs").mkdir()
    source = write_text_per_file(tmp_path / "docs")["source"]
    cache = tmp_path / "cache"
    config = DataConfig(source=source, validation_fraction=0.2)
    first = build_dataset(config, SEQ_LEN, cache_dir=str(cache))
    built = {split: np.array(first.streams(split)[source]) for split in ("train", "validation")}  # not the memmap
    (entry,) = cache_entries(cache)
    CACHE_DAMAGE[damage](cache / entry)
    with caplog.at_level("WARNING", logger="jaxscale"):
        again = build_dataset(config, SEQ_LEN, cache_dir=str(cache))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"token cache {cache / entry} is damaged" in warnings[0]
    assert warnings[0].endswith("rebuilding it")
    assert cache_entries(cache) == [entry]  # rebuilt in place; the damaged copy is gone
    for split in ("train", "validation"):
        np.testing.assert_array_equal(again.streams(split)[source], built[split])


def test_cache_dir_comes_from_argument_then_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXSCALE_CACHE", raising=False)
    assert resolve_cache_dir() == os.path.expanduser("~/.cache/jaxscale/data")
    monkeypatch.setenv("JAXSCALE_CACHE", str(tmp_path / "env-cache"))
    assert resolve_cache_dir("/somewhere/else") == "/somewhere/else"
    source = write_text_per_file(tmp_path)["source"]
    build_dataset(DataConfig(source=source), SEQ_LEN)
    assert len(cache_entries(tmp_path / "env-cache")) == 1


def test_failed_build_leaves_no_cache(tmp_path):
    source = write_text_per_file(tmp_path)["source"]
    (tmp_path / "050.txt").write_bytes(b"\xff\xfe not utf-8")  # fails half-way through tokenizing
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="050.txt"):
        build_dataset(DataConfig(source=source), SEQ_LEN, cache_dir=str(cache))
    assert cache_entries(cache) == []


def test_killed_build_is_never_used(tmp_path, shared_cache):
    cache = tmp_path / "cache"
    cache.mkdir()
    script = ("from jaxscale.data import DataConfig, build_dataset; "
              f"build_dataset(DataConfig(), {SEQ_LEN}, cache_dir={str(cache)!r})")
    build = [sys.executable, "-c", script]
    child = subprocess.Popen(build, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not cache_entries(cache) and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)  # mid-build: the built-in corpus takes seconds to tokenize
    finally:
        child.wait()
    (partial,) = cache_entries(cache)
    assert partial.startswith(".partial-")

    ds = build_dataset(DataConfig(), SEQ_LEN, cache_dir=str(cache))
    fresh = build_dataset(DataConfig(), SEQ_LEN, cache_dir=shared_cache)
    finished = [e for e in cache_entries(cache) if not e.startswith(".partial-")]
    assert len(finished) == 1 and partial in cache_entries(cache)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(ds.streams(split)["builtin"], fresh.streams(split)["builtin"])
