"""Byte and BPE tokenizers: training, vocabulary padding, round trips, the CLI, datasets using them."""
import argparse
import json

import numpy as np
import pytest

from jaxscale.cli import tokenizer as tokenizer_cli
from jaxscale.data import (
    DataConfig,
    DataError,
    build_dataset,
    check_vocab,
    load_tokenizer,
    train_tokenizer,
)

SAMPLES = ["The \"assert\" statement is a convenient way to insert debugging assertions.",
           "Ünïcödé — 日本語のテキスト, emoji 🐍, tabs\tand\nnewlines  with  double spaces.",
           "", "x"]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "data-cache")  # same path in every data test module


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory):
    pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    assert train_tokenizer("builtin", 1000, str(path)) == 1024
    return str(path)


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for text, ids in zip(SAMPLES, tok.encode_batch(SAMPLES)):
        assert ids.max(initial=0) < 256 and tok.decode(ids) == text
    assert tok.decode([104, 105, 256]) == "hi"  # EOS is not text


def test_bpe_trained_on_builtin_corpus(bpe_path):
    tok = load_tokenizer(bpe_path)
    assert tok.vocab_size == 1024 and tok.vocab_size % 128 == 0
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    encoded = tok.encode_batch(SAMPLES)
    for text, ids in zip(SAMPLES, encoded):
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids
    english = encoded[0]
    assert len(english) < len(SAMPLES[0].encode()) / 2  # it learned merges from the corpus
    assert tok.decode([*english, tok.eos_id]) == SAMPLES[0] + "<|endoftext|>"


def test_small_corpus_vocab_is_padded_to_a_multiple_of_128(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tiny.txt").write_text("abc abd abe " * 20)
    out = tmp_path / "tok.json"
    assert train_tokenizer([str(tmp_path / "tiny.txt")], 600, str(out)) == 640
    vocab = json.loads(out.read_text())
    assert any(t["content"] == "<|unused_0|>" for t in vocab["added_tokens"])
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 640 and tok.decode(tok.encode_batch(["abd abe"])[0]) == "abd abe"
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically


def test_training_rejects_token_files_and_tiny_vocabs(tmp_path):
    pytest.importorskip("tokenizers")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match=r"t\.bin holds token ids, not text"):
        train_tokenizer(str(tmp_path / "t.bin"), 512, str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=r"vocab_size 100 is smaller than the 256 byte tokens"):
        train_tokenizer("builtin", 100, str(tmp_path / "tok.json"))


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    parser = argparse.ArgumentParser(prog="jaxscale")
    tokenizer_cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.json"
    args = parser.parse_args(["tokenizer", "train", str(tmp_path / "*.txt"), "--vocab-size", "300",
                              "--out", str(out), "--text-documents", "paragraph"])
    assert args.func(args) == 0
    assert load_tokenizer(str(out)).vocab_size == 384
    assert "384 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["tokenizer", "train", "--out", str(out)])  # --vocab-size is required


def test_cli_refuses_an_output_path_before_training_and_keeps_what_is_there(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from jaxscale.cli import main

    text = tmp_path / "a.txt"
    text.write_text("the training text\n")
    (tmp_path / "dir").mkdir()
    for out, message in [(text, "a.txt exists and is not a tokenizer.json, so it is not overwritten"),
                         (tmp_path / "dir", "dir is a directory; give a file path such as"),
                         ("", "the tokenizer's output path is empty"),
                         (text / "tok.json", "cannot create the directory of")]:
        assert main(["tokenizer", "train", str(text), "--vocab-size", "300", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert text.read_text() == "the training text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "dir"]  # no tmp file left behind
    out = tmp_path / "tok.json"
    for vocab_size in ("300", "400"):  # retraining replaces a tokenizer.json
        assert main(["tokenizer", "train", str(text), "--vocab-size", vocab_size, "--out", str(out)]) == 0
    assert load_tokenizer(str(out)).vocab_size == 512


def test_a_vocabulary_far_above_any_tokenizer_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(DataError, match="vocab_size 100,000,000 is larger than any tokenizer's"):
        train_tokenizer("builtin", 100_000_000, str(tmp_path / "tok.json"))  # padding it would take ~100 GB


def test_cli_help_names_only_the_command_there_is():
    parser = argparse.ArgumentParser(prog="jaxscale")
    tokenizer_cli.add_parser(parser.add_subparsers(dest="command"))
    listing = parser.format_help()
    assert "fit a byte-level BPE tokenizer.json on text (subcommand: train)" in listing
    assert "inspect" not in listing


def test_dataset_with_bpe_tokenizer(bpe_path, shared_cache):
    ds = build_dataset(DataConfig(tokenizer=bpe_path), 64, cache_dir=shared_cache)
    assert ds.vocab_size == 1024 and ds.eos_id == load_tokenizer(bpe_path).eos_id
    batch = ds.batch(0, 8)
    assert batch["tokens"].max() < 1024
    assert " the " in ds.tokenizer.decode(batch["tokens"].ravel())
    np.testing.assert_array_equal(np.diff(batch["segment_ids"], axis=1), batch["tokens"][:, 1:] == ds.eos_id)
    byte_ds = build_dataset(DataConfig(), 64, cache_dir=shared_cache)
    assert ds.num_windows() < byte_ds.num_windows() / 2  # the same text in fewer tokens
    check_vocab(ds, 1024)
    with pytest.raises(DataError, match="model.vocab_size"):
        check_vocab(ds, 512)


def test_tokenizer_without_a_known_eos_token(bpe_path, tmp_path):
    with pytest.raises(DataError, match=r"no end-of-document token among \('</s>',\); set data.eos_token"):
        load_tokenizer(bpe_path, eos_token="</s>")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json is not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))


def test_cli_errors_name_the_flags_the_user_gave_not_config_keys(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from jaxscale.cli import main

    (tmp_path / "x.jsonl").write_text('{"body": "some text"}\n')
    out = str(tmp_path / "tok.json")
    for arguments, message in [
            ([str(tmp_path / "x.jsonl")], "record has no field 'text' (its keys: ['body']); set --text-field to"),
            ([str(tmp_path / "*.nomatch")], "fix the pattern in the sources given to `jaxscale tokenizer train`"),
            ([str(tmp_path / "nothere.txt")], "fix the sources given to `jaxscale tokenizer train`"),
            (["builtin", "--vocab-size", "100"], "--vocab-size 100 is smaller than the 256 byte tokens")]:
        assert main(["tokenizer", "train", *arguments, "--out", out] + (
            [] if "--vocab-size" in arguments else ["--vocab-size", "300"])) == 2
        err = capsys.readouterr().err
        assert message in err and "data." not in err and "Traceback" not in err
