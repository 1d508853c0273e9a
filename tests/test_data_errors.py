"""Bad input raises DataError naming the file (or setting) and saying what to do."""
import json

import numpy as np
import pytest

from jaxscale.data import DataConfig, DataError, build_dataset, check_vocab

SEQ_LEN = 16
TEXT = "Some real text for a document that is long enough to fill a row or two. " * 3


def build(tmp_path, **cfg):
    cfg = DataConfig(validation_fraction=0.0, **cfg)
    return build_dataset(cfg, SEQ_LEN, cache_dir=str(tmp_path / "cache"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.txt does not exist"):
        build(tmp_path, source=str(tmp_path / "nothere.txt"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"\*\.jsonl' matches no files"):
        build(tmp_path, source=str(tmp_path / "*.jsonl"))


def test_plain_directory_asks_for_a_glob(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match=r"corpus is a directory; use a glob such as .*corpus/\*\*/\*\.txt"):
        build(tmp_path, source=str(tmp_path / "corpus"))


@pytest.mark.parametrize("name, content", [("empty.txt", b""), ("blank.txt", b"\n  \n"),
                                           ("empty.jsonl", b"\n"), ("empty.bin", b"")])
def test_empty_file(tmp_path, name, content):
    (tmp_path / "ok.txt").write_text(TEXT)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name} is empty"):
        build(tmp_path, source=str(tmp_path / name))


def test_empty_npy(tmp_path):
    np.save(tmp_path / "none.npy", np.zeros(0, np.uint16))
    with pytest.raises(DataError, match=r"none\.npy is empty"):
        build(tmp_path, source=str(tmp_path / "none.npy"))


def test_token_file_with_odd_byte_length(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"odd\.bin is 3 bytes, not a multiple of 2 .*token_dtype=uint16"):
        build(tmp_path, source=str(tmp_path / "odd.bin"))


def test_uint32_token_file_read_as_uint16(tmp_path):
    np.arange(100, dtype=np.uint32).tofile(tmp_path / "wide.bin")
    with pytest.raises(DataError, match=r"wide\.bin looks like uint32 .*token_dtype: uint32"):
        build(tmp_path, source=str(tmp_path / "wide.bin"))


def test_uint16_token_file_read_as_uint32(tmp_path):
    np.full(100, 200, dtype=np.uint16).tofile(tmp_path / "narrow.bin")
    with pytest.raises(DataError, match=r"narrow\.bin has token id 13107400 at position 0, outside .* 257"):
        build(tmp_path, source=str(tmp_path / "narrow.bin"), token_dtype="uint32")


def test_token_id_beyond_the_tokenizer_vocab(tmp_path):
    tokens = np.full(200, 65, dtype=np.uint16)
    tokens[150] = 300
    np.save(tmp_path / "gpt2.npy", tokens)
    with pytest.raises(DataError, match=r"gpt2\.npy has token id 300 at position 150, .*set data.tokenizer"):
        build(tmp_path, source=str(tmp_path / "gpt2.npy"))


def test_npy_of_floats(tmp_path):
    np.save(tmp_path / "floats.npy", np.ones(10))
    with pytest.raises(DataError, match=r"floats\.npy holds a float64 array"):
        build(tmp_path, source=str(tmp_path / "floats.npy"))


def test_jsonl_without_the_text_field(tmp_path):
    records = [{"text": TEXT}, {"text": TEXT}, {"content": TEXT, "url": "x"}]
    (tmp_path / "web.jsonl").write_text("\n".join(map(json.dumps, records)))
    with pytest.raises(DataError, match=r"web\.jsonl:3: record has no field 'text' "
                                        r"\(its keys: \['content', 'url'\]\); set data.text_field"):
        build(tmp_path, source=str(tmp_path / "web.jsonl"))


def test_jsonl_with_a_broken_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        build(tmp_path, source=str(tmp_path / "broken.jsonl"))


def test_text_file_that_is_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text .*tokens:"):
        build(tmp_path, source=str(tmp_path / "latin1.txt"))


def test_jsonl_file_that_is_not_utf8_names_the_line(tmp_path):
    lines = [json.dumps({"text": TEXT}), json.dumps({"text": "café"}, ensure_ascii=False)]
    (tmp_path / "latin1.jsonl").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    message = (r"latin1\.jsonl:2: not UTF-8 text \(invalid continuation byte at byte \d+ of the line\); "
               r"JSON Lines files must be UTF-8: re-encode it")
    with pytest.raises(DataError, match=message):
        build(tmp_path, source=str(tmp_path / "latin1.jsonl"))


def test_parquet_without_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": [TEXT]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet has no column 'text' \(its columns: \['body'\]\)"):
        build(tmp_path, source=str(tmp_path / "t.parquet"))


def test_glob_mixing_text_and_token_files(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "b.bin")
    with pytest.raises(DataError, match=r"matches both token files .* separate data.mixture entries"):
        build(tmp_path, source=str(tmp_path / "*"))


def test_source_shorter_than_one_row(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match=r"short\.txt' has 5 training tokens in 1 documents "
                                        r"\(0 more held out for validation\), fewer than one row"):
        build(tmp_path, source=str(tmp_path / "short.txt"))


def test_a_single_file_holds_out_the_end_of_its_tokens(tmp_path):
    (tmp_path / "book.txt").write_text(TEXT * 20)  # one document: held out whole or not at all
    whole = build(tmp_path, source=str(tmp_path / "book.txt"))._splits["train"].streams[0]
    split = build_dataset(DataConfig(source=str(tmp_path / "book.txt"), validation_fraction=0.1), SEQ_LEN,
                          cache_dir=str(tmp_path / "cache"))
    [train], [validation] = split._splits["train"].streams, split._splits["validation"].streams
    assert len(validation) == round(0.1 * len(whole)) and len(train) + len(validation) == len(whole)
    np.testing.assert_array_equal(np.concatenate([train, validation]), whole)  # the last tenth, as nanoGPT


def test_a_file_too_short_for_a_row_of_each_split_is_refused(tmp_path):
    (tmp_path / "note.txt").write_text(TEXT[:25])  # 26 tokens: one row of 17, not two
    with pytest.raises(DataError, match=r"no validation row .*text_documents: paragraph"):
        build_dataset(DataConfig(source=str(tmp_path / "note.txt"), validation_fraction=0.1), SEQ_LEN,
                      cache_dir=str(tmp_path / "cache"))


def test_validation_batch_without_validation_data(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(DataError, match=r"no validation data: set data.validation_fraction"):
        build(tmp_path, source=str(tmp_path / "a.txt")).batch(0, 2, split="validation")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file .*missing\.json does not exist"):
        build(tmp_path, tokenizer=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("setting, value, message", [
    ("validation_fraction", 1.5, r"data.validation_fraction=1.5 must be in \[0, 1\)"),
    ("prefetch", -1, r"data.prefetch=-1 must be >= 0"),
    ("text_documents", "line", r"data.text_documents must be one of"),
    ("token_dtype", "float32", r"data.token_dtype must be one of \('uint16', 'uint32'\)"),
    ("mixture", {"builtin": -1.0}, r"data.mixture weight of 'builtin' must be >= 0"),
    ("mixture", {"builtin": 0.0}, r"data.mixture weights sum to zero"),
])
def test_bad_settings(setting, value, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**{setting: value})


def test_mixture_weight_too_small_to_schedule(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT)
    with pytest.raises(DataError, match=r"weight of .*b\.txt' is below 1/4096"):
        build(tmp_path, mixture={str(tmp_path / "a.txt"): 1.0, str(tmp_path / "b.txt"): 1e-5})


def test_check_vocab_asks_to_set_model_vocab_size(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    ds = build(tmp_path, source=str(tmp_path / "a.txt"))
    check_vocab(ds, 257)
    check_vocab(ds, 512)
    with pytest.raises(DataError, match=r"257 token ids but model.vocab_size is 256; "
                                        r"set model.vocab_size to at least 257 \(e.g. 384"):
        check_vocab(ds, 256)


def test_infinite_mixture_weight():
    with pytest.raises(DataError, match=r"data.mixture weight of 'builtin' must be >= 0 and finite, got inf"):
        DataConfig(mixture={"builtin": float("inf"), "a.txt": 1.0})


@pytest.mark.parametrize("setting, value", [("validation_source", "val.bin"),
                                            ("mixture", {"builtin": 1.0, "val.bin": 1.0})])
def test_missing_file_names_the_setting_it_came_from(tmp_path, setting, value):
    with pytest.raises(DataError, match=rf"val\.bin does not exist; fix data\.{setting} "):
        build(tmp_path, **{setting: value})


def test_uint32_token_file_of_a_large_vocab_read_as_uint16(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    # ids above 65535 too, as a large vocabulary has: then no uint16 half is always 0
    np.random.default_rng(0).integers(0, 70_000, 5000).astype(np.uint32).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin is read as uint16 .* vocabulary of 70001; "
                                        r"set data.token_dtype: uint32"):
        build(tmp_path, source=str(tmp_path / "train.bin"), tokenizer=str(tmp_path / "big.json"))


def test_an_hf_source_directory_that_is_no_saved_dataset_names_the_setting(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text(TEXT)
    with pytest.raises(DataError, match=r"plain is a directory, but not a dataset written by Hugging Face datasets' "
                                        r"save_to_disk .*in data.source give the directory save_to_disk wrote"):
        build(tmp_path, source=f"hf:{tmp_path / 'plain'}")


def test_a_damaged_saved_hf_dataset_is_a_data_error(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")  # looks saved, holds nothing
    with pytest.raises(DataError, match=r"cannot read the Hugging Face dataset saved in .*saved: .*write it again"):
        build(tmp_path, source=f"hf:{tmp_path / 'saved'}")
