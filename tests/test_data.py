"""The data pipeline: cleaning and errors, tokenizers, embedded corpus, token files, packing,
resumable and sharded iterators."""

import json
import os
import sysconfig
import unicodedata

import numpy as np
import pytest

from llm_mp.config import DataConfig
from llm_mp.data import (
  BpeTokenizer,
  ByteTokenizer,
  DataError,
  PackedRows,
  TokenSplit,
  build_token_shards,
  build_tokenizer,
  clean_documents,
  load_corpus,
  load_tokenizer,
  make_eval_iterator,
  make_train_iterator,
  prepare_data,
  read_documents,
  split_documents,
  stdlib_corpus,
)
from llm_mp.data.shards import token_dtype, tokenize

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
  assert "3 documents" in str(summary) and "1 duplicate" in str(summary)


def test_max_docs_keeps_the_first_documents():
  kept, summary = clean_documents([f"document number {i}" for i in range(5)], max_docs=2)
  assert kept == ["document number 0", "document number 1"]
  assert summary.removed["max_docs"] == 3


def test_reads_txt_and_jsonl_recursively_in_sorted_order(tmp_path):
  _write(
    tmp_path / "b" / "two.jsonl",
    json.dumps({"text": "json doc one"}) + "\n\n" + json.dumps({"text": "json doc two"}),
  )
  _write(
    tmp_path / "a.txt", "first doc\n\nstill first (one blank line)\n\n\nsecond doc\n \n\t\nthird"
  )
  _write(tmp_path / "ignored.md", "not read")
  docs, n_files, skipped = read_documents([str(tmp_path)])
  assert docs == [
    "first doc\n\nstill first (one blank line)",
    "second doc",
    "third",
    "json doc one",
    "json doc two",
  ]
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


@pytest.mark.slow
def test_default_corpus_is_deterministic_and_large_enough(tmp_path, monkeypatch):
  stdlib = sysconfig.get_paths()["stdlib"]
  first = stdlib_corpus._build(stdlib)  # parsed, no cache
  assert list(first) == stdlib_corpus.default_corpus()
  chars = sum(map(len, first))
  assert 1_000_000 < chars < 5_000_000
  assert len(first) > 100 and all(first)
  assert any('The "if" statement' in d for d in first)  # the language-reference topics
  # The cache file: written by the first process, read by the next; a corrupt one rebuilt.
  monkeypatch.setenv("LLM_MP_CACHE", str(tmp_path / "cache"))
  path = stdlib_corpus.cache_path(stdlib)
  assert os.path.dirname(path) == str(tmp_path / "cache")
  # Each unreadable file is rebuilt: the parse (checked above) is counted, not repeated.
  builds = []
  monkeypatch.setattr(stdlib_corpus, "_build", lambda s: builds.append(s) or first)
  for before in (None, "{not json", json.dumps(["stale"] * 0)):  # absent, corrupt, empty
    if before is not None:
      open(path, "w", encoding="utf-8").write(before)
    stdlib_corpus._cached.cache_clear()
    assert stdlib_corpus.default_corpus() == list(first)
    assert json.load(open(path, encoding="utf-8")) == list(first)
  assert builds == [stdlib] * 3
  stdlib_corpus._cached.cache_clear()
  with open(path, "w", encoding="utf-8") as f:  # a valid file is what a later process reads
    json.dump(["cached"], f)
  assert stdlib_corpus.default_corpus() == ["cached"]
  stdlib_corpus._cached.cache_clear()
  os.remove(path)


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


# ---------------------------------------------------------------- splits and token files


def _docs(n=60, seed=0):
  """Distinct documents of 5..60 words."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "эта", "θ", "日本", "🙂"]
  return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(5, 60))) for i in range(n)]


def test_split_is_deterministic_by_content_and_holds_out_the_fraction_of_text():
  docs = _docs(40)
  train, val = split_documents(docs, 0.1)
  assert sorted(train + val) == sorted(docs)  # whole documents
  # At least 10% of the characters, overshooting by less than one document (<= 60 words).
  share = sum(map(len, val)) / sum(map(len, docs))
  assert 0.1 <= share < 0.1 + max(map(len, docs)) / sum(map(len, docs)), share
  assert split_documents(docs, 0.1) == (train, val)
  assert sorted(split_documents(docs[::-1], 0.1)[1]) == sorted(val)  # order-independent
  assert len(split_documents(docs[:3], 0.01)[1]) == 1
  assert split_documents(docs, 0.0) == (docs, [])


def test_few_large_documents_are_split_by_characters_at_the_tail():
  one = ["abcdefghij" * 10]
  assert split_documents(one, 0.1) == (["abcdefghij" * 9], ["abcdefghij"])
  # Whichever whole document is held out, it is 5x or 45x the 2% asked for.
  train, val = split_documents(["x" * 900, "y" * 100], 0.02)
  assert (train, val) == (["x" * 900, "y" * 80], ["y" * 20])
  docs = ["x" * 900, "y" * 50, "z" * 50]  # 15%: 6x or 1/3 as whole documents
  train, val = split_documents(docs, 0.15)  # the tail spans whole documents and a part
  assert (train, val) == (["x" * 850], ["x" * 50, "y" * 50, "z" * 50])
  assert split_documents(docs, 0.15) == (train, val)


def test_token_files_are_cached_by_content(tmp_path):
  tok = ByteTokenizer()
  train, val = split_documents(_docs(), 0.1)
  first = build_token_shards(train, val, tok, str(tmp_path))
  assert not first.reused
  assert first.train.tokens.dtype == np.uint16 and isinstance(first.train.tokens, np.memmap)
  stream = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in train])
  np.testing.assert_array_equal(first.train.tokens, stream)
  assert first.train.num_docs == len(train) and first.val.num_docs == len(val)
  assert all(first.train.tokens[s] == tok.bos_id for s in first.train.starts)
  files = sorted(os.listdir(first.directory))
  mtimes = {f: os.stat(os.path.join(first.directory, f)).st_mtime_ns for f in files}

  again = build_token_shards(train, val, tok, str(tmp_path))
  assert again.reused and again.directory == first.directory
  assert {f: os.stat(os.path.join(again.directory, f)).st_mtime_ns for f in files} == mtimes
  np.testing.assert_array_equal(again.val.tokens, first.val.tokens)
  changed = build_token_shards(train[:-1], val, tok, str(tmp_path))
  assert not changed.reused and changed.directory != first.directory
  assert not any(f.endswith(".tmp") for f in os.listdir(first.directory))
  assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_prepare_data_reuses_run_tokenizer_and_rejects_another_kind(tmp_path):
  corpus = tmp_path / "corpus.jsonl"
  _write(corpus, "\n".join(json.dumps({"text": d}) for d in _docs()))
  run = str(tmp_path / "run")
  cfg = DataConfig(paths=(str(corpus),), tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.1)
  first = prepare_data(cfg, run)
  assert os.path.isfile(os.path.join(run, "tokenizer.json")) and not first.reused
  assert first.cache_dir.startswith(os.path.join(run, "data"))
  again = prepare_data(cfg, run)
  assert again.reused and again.tokenizer.to_json() == first.tokenizer.to_json()
  assert "60 documents" in str(again)
  with pytest.raises(DataError, match="holds a bpe tokenizer but data.tokenizer='byte'"):
    prepare_data(DataConfig(paths=(str(corpus),)), run)


# ---------------------------------------------------------------- packing


def test_packing_hand_made_example():
  b, e, p = 1, 2, 0  # bos, eos, pad;  stream: B a b E | B c E | B d e f E
  split = TokenSplit(
    np.array([b, 10, 11, e, b, 12, e, b, 13, 14, 15, e], np.uint16), np.array([0, 4, 7])
  )
  rows = PackedRows(split, seq_len=5, pad_id=p)
  assert len(rows) == 3  # 11 targets in rows of 5
  expect = [
    # inputs             targets                 segment_ids      positions
    ([b, 10, 11, e, b], [10, 11, e, -1, 12], [1, 1, 1, 1, 2], [0, 1, 2, 3, 0]),
    ([12, e, b, 13, 14], [e, -1, 13, 14, 15], [1, 1, 2, 2, 2], [0, 1, 0, 1, 2]),
    ([15, p, p, p, p], [e, -1, -1, -1, -1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]),
  ]
  for r, (inputs, targets, segments, positions) in enumerate(expect):
    row = rows[r]
    assert all(v.dtype == np.int32 and v.shape == (5,) for v in row.values())
    np.testing.assert_array_equal(row["inputs"], inputs)
    np.testing.assert_array_equal(row["targets"], targets)
    np.testing.assert_array_equal(row["segment_ids"], segments)
    np.testing.assert_array_equal(row["positions"], positions)
  pad = rows.gather(np.array([-1, 3]))
  assert (pad["targets"] == -1).all() and (pad["segment_ids"] == 0).all()
  assert (pad["inputs"] == p).all()
  with pytest.raises(DataError, match="cannot pack 0 documents"):
    PackedRows(TokenSplit(np.zeros(0, np.uint16), np.zeros(0, np.int64)), 5, p)


def test_packed_targets_are_next_tokens_within_documents():
  tok = ByteTokenizer()
  split = TokenSplit(*tokenize(_docs(20), tok))
  rows = PackedRows(split, seq_len=32, pad_id=tok.pad_id)
  batch = rows.gather(np.arange(len(rows)))
  inputs, targets, seg, pos = (batch[k] for k in ("inputs", "targets", "segment_ids", "positions"))
  # Within a row and a document, the target is the next input.
  inner = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(targets[:, :-1][inner], inputs[:, 1:][inner])
  # Masked targets are exactly the EOS -> next BOS boundaries and the padding.
  np.testing.assert_array_equal(targets < 0, (inputs == tok.eos_id) | (seg == 0))
  # Every token but the first is a target once, in order (a BOS where masked).
  flat = targets[seg > 0]
  flat[flat < 0] = tok.bos_id
  np.testing.assert_array_equal(flat, split.tokens[1:])
  # Positions count from each document's start within the row.
  for r in range(len(rows)):
    expect = [0] * 32
    for j in range(1, 32):
      same = seg[r, j] == seg[r, j - 1] and seg[r, j] > 0
      expect[j] = expect[j - 1] + 1 if same else 0
    np.testing.assert_array_equal(pos[r], expect)


# ---------------------------------------------------------------- iterators

B, T = 8, 64  # global batch and row length


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  _write(root / "corpus" / "docs.txt", "\n\n\n".join(_docs(30)))
  cfg = DataConfig(paths=(str(root / "corpus"),), val_fraction=0.25, seq_len=T)
  return prepare_data(cfg, str(root / "run"))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_shape_determinism_and_epochs(prepared):
  it = make_train_iterator(prepared, B, seed=3, process_index=0, process_count=1)
  batches = _take(it, 24)
  assert set(batches[0]) == {"inputs", "targets", "segment_ids", "positions"}
  assert all(v.dtype == np.int32 and v.shape == (B, T) for b in batches for v in b.values())
  _assert_batches_equal(
    batches, _take(make_train_iterator(prepared, B, seed=3, process_index=0, process_count=1), 24)
  )
  other = next(
    make_train_iterator(prepared, B, seed=4, seq_len=T, process_index=0, process_count=1)
  )
  assert not np.array_equal(other["inputs"], batches[0]["inputs"])
  short = next(make_train_iterator(prepared, B, seq_len=T // 2, process_index=0, process_count=1))
  assert short["inputs"].shape == (B, T // 2)
  # The first len(rows) rows drawn are a permutation of all rows; the next epoch reshuffles.
  rows = PackedRows(prepared.train, T, prepared.tokenizer.pad_id)
  drawn = np.concatenate([b["inputs"] for b in batches])
  n = len(rows)
  assert 2 * n <= len(drawn)
  everything = rows.gather(np.arange(n))["inputs"]
  for epoch in (drawn[:n], drawn[n : 2 * n]):
    np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(everything, axis=0))
  assert not np.array_equal(drawn[:n], drawn[n : 2 * n])


def test_train_iterator_resumes_exactly_from_json_state(prepared):
  it = make_train_iterator(prepared, B, seed=7, process_index=0, process_count=1)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
  expected = _take(it, 5)
  restored = make_train_iterator(prepared, B, seed=7, process_index=0, process_count=1)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 5), expected)


def test_processes_get_disjoint_slices_of_the_global_batch(prepared):
  def run(make, index, count, n):
    return _take(make(prepared, B, process_index=index, process_count=count), n)

  for make, n in ((make_train_iterator, 6), (make_eval_iterator, 3)):
    whole = run(make, 0, 1, n)
    for count in (2, 4):
      parts = [run(make, i, count, n) for i in range(count)]
      assert all(b["inputs"].shape == (B // count, T) for p in parts for b in p)
      joined = [{k: np.concatenate([p[j][k] for p in parts]) for k in whole[j]} for j in range(n)]
      _assert_batches_equal(joined, whole)
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    make_train_iterator(prepared, B, process_index=0, process_count=3)


def test_eval_iterator_is_one_ordered_padded_pass(prepared):
  rows = PackedRows(prepared.val, T, prepared.tokenizer.pad_id)
  batches = list(make_eval_iterator(prepared, B, process_index=0, process_count=1))
  assert len(batches) == -(-len(rows) // B)
  assert all(b["targets"].shape == (B, T) for b in batches)
  targets = np.concatenate([b["targets"] for b in batches])
  np.testing.assert_array_equal(targets[: len(rows)], rows.gather(np.arange(len(rows)))["targets"])
  assert len(targets) > len(rows) and (targets[len(rows) :] == -1).all()
  assert (
    len(list(make_eval_iterator(prepared, B, max_batches=1, process_index=0, process_count=1))) == 1
  )
