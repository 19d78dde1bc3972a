"""The data pipeline: cleaning, file reading and errors, tokenizers, embedded corpus."""

import json
import os
import sysconfig
import unicodedata

import pytest

from llm_mp.config import DataConfig
from llm_mp.data import stdlib_corpus
from llm_mp.data.corpus import clean_documents, load_corpus, read_documents
from llm_mp.data.files import DataError
from llm_mp.data.tokenizer import (BpeTokenizer, ByteTokenizer, build_tokenizer,
                                   load_tokenizer)

UNICODE_SAMPLES = [
    "",
    "plain ascii",
    "  leading and trailing   \t\n\n  whitespace runs \r\n ",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "CJK 你好，世界 日本語のテキスト 한국어",
    "combining e\u0301 a\u0308 (not NFC) and precomposed é ä",
    "RTL עברית العربية, math ∑∫√, nul \x00 and del \x7f",
    "<|eos|> <|bos|> <|pad|> literal special strings",
]


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  return str(path)


# ---------------------------------------------------------------- cleaning and reading


def test_cleaning_normalises_strips_and_counts():
  docs = [
      "cafe\u0301 is a long enough document",  # NFD: becomes NFC
      "caf\u00e9 is a long enough document",  # the same text once NFC: a duplicate
      "bell\x07 and nul\x00 go, tab\tand\nnewline stay, C1\x85 goes",
      "tiny",
      "   \n\t  ",
      "windows\r\nline\rendings become newlines",
  ]
  kept, summary = clean_documents(docs, min_doc_chars=10)
  assert kept == [
      "caf\u00e9 is a long enough document",
      "bell and nul go, tab\tand\nnewline stay, C1 goes",
      "windows\nline\nendings become newlines",
  ]
  assert all(unicodedata.is_normalized("NFC", d) for d in kept)
  assert summary.removed == {"too_short": 2, "duplicate": 1, "max_docs": 0}
  assert summary.control_chars == 3
  assert summary.documents == 3 and summary.characters == sum(map(len, kept))
  assert "3 documents" in summary.format() and "1 duplicate" in summary.format()


def test_max_docs_keeps_the_first_documents():
  kept, summary = clean_documents([f"document number {i}" for i in range(5)], max_docs=2)
  assert kept == ["document number 0", "document number 1"]
  assert summary.removed["max_docs"] == 3


def test_reads_txt_and_jsonl_recursively_in_sorted_order(tmp_path):
  _write(tmp_path / "b" / "two.jsonl",
         json.dumps({"text": "json doc one"}) + "\n\n" + json.dumps({"text": "json doc two"}))
  _write(tmp_path / "a.txt", "first doc\n\nstill first (one blank line)\n\n\nsecond doc\n \n\t\nthird")
  _write(tmp_path / "ignored.md", "not read")
  docs, n_files, skipped = read_documents([str(tmp_path)])
  assert docs == ["first doc\n\nstill first (one blank line)", "second doc", "third",
                  "json doc one", "json doc two"]
  assert (n_files, skipped) == (2, ())


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = _write(tmp_path / "x.jsonl", '{"text": "ok"}\n{"title": "no text"}\n')
  with pytest.raises(DataError, match=f"{path}:2: expected an object"):
    read_documents([path])


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
  path = _write(tmp_path / "bad.txt", b"valid text \xff\xfe then more")
  with pytest.raises(DataError, match=rf"{path}: not valid UTF-8 \(first bad byte at offset 11\)"):
    load_corpus(DataConfig(paths=(str(tmp_path),)))


def test_skip_bad_files_warns_and_continues(tmp_path):
  bad = _write(tmp_path / "bad.txt", b"\xc3\x28 broken")
  _write(tmp_path / "good.txt", "a perfectly good document")
  with pytest.warns(UserWarning, match="bad.txt"):
    docs, summary = load_corpus(DataConfig(paths=(str(tmp_path),), skip_bad_files=True))
  assert docs == ["a perfectly good document"]
  assert summary.skipped_files == (bad,) and summary.files == 1


def test_empty_corpus_and_missing_path_errors(tmp_path):
  _write(tmp_path / "short.txt", "tiny\n\n\nbits")
  with pytest.raises(DataError, match="empty corpus"):
    load_corpus(DataConfig(paths=(str(tmp_path),), min_doc_chars=16))
  with pytest.raises(DataError, match="empty corpus"):
    load_corpus(DataConfig(paths=(str(tmp_path / "short.txt"),), max_docs=0, min_doc_chars=1))
  missing = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match=f"data path not found: {missing}"):
    load_corpus(DataConfig(paths=(missing,)))


# ---------------------------------------------------------------- embedded corpus


def test_default_corpus_is_deterministic_and_large_enough():
  first = stdlib_corpus._build.__wrapped__(sysconfig.get_paths()["stdlib"])  # bypass the cache
  assert list(first) == stdlib_corpus.default_corpus()
  chars = sum(map(len, first))
  assert 1_000_000 < chars < 5_000_000
  assert len(first) > 100 and all(first)
  assert any("The \"if\" statement" in d for d in first)  # the language-reference topics


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_and_specials(tmp_path):
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  for s in UNICODE_SAMPLES:
    ids = tok.encode(s)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == s
  assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
  assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"  # invalid sampled bytes are replaced
  tok.save(str(tmp_path))
  assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


@pytest.fixture(scope="module")
def bpe():
  docs = stdlib_corpus.default_corpus()[:40] + UNICODE_SAMPLES
  return build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=400), docs)


def test_bpe_has_requested_vocab_and_round_trips(bpe):
  assert isinstance(bpe, BpeTokenizer)
  assert bpe.vocab_size == 400
  assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
  for s in UNICODE_SAMPLES + ["never seen: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200d\ufeff", " x", "x "]:
    ids = bpe.encode(s)
    assert bpe.eos_id not in ids and bpe.bos_id not in ids  # literal specials are plain text
    assert bpe.decode(ids) == s
  assert bpe.encode_batch(UNICODE_SAMPLES) == [bpe.encode(s) for s in UNICODE_SAMPLES]
  text = "Return the number of items in a container."
  assert len(bpe.encode(text)) < 0.7 * len(text.encode())  # merges were learned


def test_bpe_save_load_and_errors(bpe, tmp_path):
  bpe.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, BpeTokenizer) and loaded.to_json() == bpe.to_json()
  s = UNICODE_SAMPLES[-1] + UNICODE_SAMPLES[3]
  assert loaded.encode(s) == bpe.encode(s) and loaded.decode(loaded.encode(s)) == s
  with pytest.raises(DataError, match="bpe_vocab_size=100 must be >= 259"):
    build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=100), ["some text"])
  with pytest.raises(DataError, match="tokenizer file not found"):
    load_tokenizer(str(tmp_path / "empty"))
  _write(tmp_path / "junk" / "tokenizer.json", "{not json")
  with pytest.raises(DataError, match="not a tokenizer"):
    load_tokenizer(str(tmp_path / "junk"))
