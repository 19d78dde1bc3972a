"""Labelled data for classification: readers and bad rows, fixed-length rows, iterators, the
built-in set, metrics and the bag-of-words baseline."""

import json
import os

import numpy as np
import pytest
import scipy.sparse

from llm_mp.classification import (
  bow_logistic_regression,
  classification_metrics,
  logistic_regression,
)
from llm_mp.config import DataConfig
from llm_mp.data import (
  ByteTokenizer,
  DataError,
  ExampleRows,
  builtin_labelled,
  encode_labelled,
  ordered_batches,
  prepare_labelled,
  read_labelled,
  shuffled_batches,
)
from llm_mp.data import labelled as labelled_lib
from llm_mp.data.examples import hold_out

SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")
BYTE = ByteTokenizer()
PAD, BOS, EOS = BYTE.pad_id, BYTE.bos_id, BYTE.eos_id


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  return str(path)


# ---------------------------------------------------------------- reading


def test_tsv_is_unquoted_cleaned_and_labels_sorted(tmp_path):
  path = _write(
    tmp_path / "a.tsv",
    "sentence\tlabel\n"
    'a "quoted" word stays literal \tpos\n'
    "cafe\u0301 with a bell\x07 \tneg\n"
    "\n"  # blank lines are skipped
    "third one\tpos\n",
  )
  texts, labels, names, skipped = read_labelled(path, "sentence", "label")
  assert texts == ['a "quoted" word stays literal', "caf\u00e9 with a bell", "third one"]
  assert names == ("neg", "pos")
  np.testing.assert_array_equal(labels, [1, 0, 1])
  assert labels.dtype == np.int32 and skipped == 0
  # Given names map by position; the files are read in order.
  texts2, labels2, names2, _ = read_labelled(
    [path, path], "sentence", "label", labels=("pos", "neg")
  )
  assert texts2 == texts * 2 and names2 == ("pos", "neg")
  np.testing.assert_array_equal(labels2, [0, 1, 0] * 2)


def test_csv_quoted_fields_and_line_numbers_after_a_multiline_field(tmp_path):
  rows = [
    "id,text,label",  # line 1
    '1,"hello, world",b',  # line 2
    '2,"two\nlines with ""quotes""",a',  # lines 3-4
    "3,plain,b",  # line 5
    "4,,a",
  ]  # line 6: no text
  path = _write(tmp_path / "a.csv", "\n".join(rows) + "\n")
  with pytest.raises(DataError, match=rf"^{path}:6: missing text \(field 'text'"):
    read_labelled(path, "text", "label")
  texts, labels, names, skipped = read_labelled(path, "text", "label", bad_rows="skip")
  assert texts == ["hello, world", 'two\nlines with "quotes"', "plain"]
  assert names == ("a", "b") and skipped == 1
  np.testing.assert_array_equal(labels, [1, 0, 1])


def test_jsonl_integer_and_string_labels_sort_numerically(tmp_path):
  lines = [
    {"text": "ten", "label": 10},
    {"text": "two", "label": "2"},
    {"text": "zero", "label": 0, "extra": [1]},
    {"text": "one", "label": " 1 "},
  ]
  path = _write(tmp_path / "a.jsonl", "\n\n".join(json.dumps(x) for x in lines))
  texts, labels, names, _ = read_labelled(path, "text", "label")
  assert texts == ["ten", "two", "zero", "one"]
  assert names == ("0", "1", "2", "10")  # numeric order, not "10" < "2"
  np.testing.assert_array_equal(labels, [3, 2, 0, 1])


def test_jsonl_lines_end_at_newline_only(tmp_path):
  # A raw U+2028 inside a JSON string is text (str.splitlines would cut the object in two);
  # CRLF endings are fine.
  rows = [{"text": "one\u2028line", "label": 1}, {"text": "two", "label": 0}]
  path = _write(tmp_path / "a.jsonl", "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
  texts, labels, _, _ = read_labelled(path, "text", "label")
  assert texts == ["one\u2028line", "two"] and labels.tolist() == [1, 0]


BAD_ROWS = [  # (suffix, the bad line 3, expected problem)
  (".tsv", "\t1", "missing text"),
  (".tsv", "some text\t", "missing label"),
  (".tsv", "  \t \t", "expected 2 fields as in the header, found 3"),
  (".tsv", "no tab here", "expected 2 fields as in the header, found 1"),
  (".tsv", "fine text\t7", "label '7' is not one of ('0', '1')"),
  (".csv", '"quoted, text",', "missing label"),
  (".jsonl", "{not json", "invalid JSON"),
  (".jsonl", "[1, 2]", "expected a JSON object, found list"),
  (".jsonl", '{"sentence": "no label"}', "missing label"),
  (".jsonl", '{"label": 1}', "missing text"),
  (".jsonl", '{"sentence": 5, "label": 1}', "field 'sentence' is not a string"),
  (".jsonl", '{"sentence": "x", "label": 1.5}', "label 1.5 is not a string or an integer"),
  (".jsonl", '{"sentence": "x", "label": true}', "label True is not a string or an integer"),
]


@pytest.mark.parametrize("suffix,bad,problem", BAD_ROWS)
def test_bad_row_names_file_and_line_or_is_skipped(tmp_path, suffix, bad, problem):
  if suffix == ".jsonl":
    good = [json.dumps({"sentence": f"good {i}", "label": i}) for i in (0, 1)]
    lines = [good[0], "", bad, good[1]]  # the bad row is on line 3
  else:
    sep = "\t" if suffix == ".tsv" else ","
    lines = [f"sentence{sep}label", f"good 0{sep}0", bad, f"good 1{sep}1"]
  path = _write(tmp_path / f"data{suffix}", "\n".join(lines) + "\n")
  with pytest.raises(DataError) as e:
    read_labelled(path, "sentence", "label", labels=("0", "1"))
  assert str(e.value).startswith(f"{path}:3: {problem}"), str(e.value)
  texts, labels, names, skipped = read_labelled(
    path, "sentence", "label", bad_rows="skip", labels=("0", "1")
  )
  assert (texts, labels.tolist(), names, skipped) == (["good 0", "good 1"], [0, 1], ("0", "1"), 1)


def test_header_without_the_columns_is_an_error_even_when_skipping(tmp_path):
  path = _write(tmp_path / "a.tsv", "sentence\tlabel\nhello\t1\n")
  for bad_rows in ("error", "skip"):
    with pytest.raises(
      DataError,
      match=rf"^{path}:1: header \['sentence', 'label'\] lacks "
      r"column\(s\) \['text'\]",
    ):
      read_labelled(path, "text", "label", bad_rows=bad_rows)


def test_file_level_errors(tmp_path):
  # "sentence\tlabel\n" is 15 bytes and "ok\t1\n" 5, so the bad byte is at offset 20.
  bad_utf8 = _write(tmp_path / "b.tsv", b"sentence\tlabel\nok\t1\n\xff\t0\n")
  with pytest.raises(DataError, match=rf"^{bad_utf8}: not valid UTF-8 .*offset 20\)"):
    read_labelled(bad_utf8, "sentence", "label")
  header_only = _write(tmp_path / "h.tsv", "sentence\tlabel\n")
  with pytest.raises(DataError, match=r"no labelled examples in .*h\.tsv \(0 bad row"):
    read_labelled(header_only, "sentence", "label")
  all_bad = _write(tmp_path / "x.tsv", "sentence\tlabel\n\t1\n")
  with pytest.raises(DataError, match=r"\(1 bad row\(s\) skipped\)"):
    read_labelled(all_bad, "sentence", "label", bad_rows="skip")
  with pytest.raises(DataError, match="labelled data file not found: .*nope.tsv"):
    read_labelled(str(tmp_path / "nope.tsv"), "sentence", "label")
  txt = _write(tmp_path / "a.txt", "x")
  with pytest.raises(DataError, match=r"a\.txt: unsupported file type"):
    read_labelled(txt, "sentence", "label")
  with pytest.raises(ValueError, match="data.bad_rows='drop'"):
    read_labelled(header_only, "sentence", "label", bad_rows="drop")


def test_a_label_beyond_n_classes_names_its_file_and_line(tmp_path):
  # model.n_classes=2 and a stray third label on line 5: the error points at that row, where
  # the training loop could only say that there are 3 classes.
  path = _write(tmp_path / "a.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1\nd\t2\ne\t0\n")
  with pytest.raises(
    DataError,
    match=rf"^{path}:5: label '2' makes 3 classes, more than model.n_classes=2 "
    r"\(the others: \('0', '1'\)\)",
  ):
    read_labelled(path, "sentence", "label", n_classes=2)
  texts, labels, names, skipped = read_labelled(
    path, "sentence", "label", bad_rows="skip", n_classes=2
  )
  assert (texts, labels.tolist(), names, skipped) == (
    ["a", "b", "c", "e"],
    [0, 1, 1, 0],
    ("0", "1"),
    1,
  )
  assert read_labelled(path, "sentence", "label", n_classes=3)[2] == ("0", "1", "2")


def test_training_a_classifier_on_a_stray_label_names_its_file_and_line(tmp_path):
  from llm_mp.config import apply_overrides  # pylint: disable=import-outside-toplevel
  from llm_mp.presets import get_preset  # pylint: disable=import-outside-toplevel
  from llm_mp.train import prepare_task_data  # pylint: disable=import-outside-toplevel

  path = _write(
    tmp_path / "a.jsonl",
    "".join(
      json.dumps({"text": t, "label": y}) + "\n"
      for t, y in (("good", "pos"), ("bad", "neg"), ("meh", "mixed"))
    ),
  )
  config = apply_overrides(
    get_preset("encoder_tiny"), ["train.task=classify", "model.n_classes=2", f"data.paths={path}"]
  )
  with pytest.raises(DataError, match=rf"^{path}:3: label 'mixed' makes 3 classes"):
    prepare_task_data(config, str(tmp_path / "run"))


@pytest.mark.skipif(not os.path.isdir(SST2), reason="../shared/data/sst2 not present")
def test_reads_sst2_train_and_dev():
  # Counts from `wc -l` minus the header and `cut -f2 | sort | uniq -c` (see SOURCES.md).
  texts, labels, names, skipped = read_labelled(
    os.path.join(SST2, "train.tsv"), "sentence", "label"
  )
  assert (len(texts), int(labels.sum()), names, skipped) == (67349, 37569, ("0", "1"), 0)
  assert texts[0] == "hide new secretions from the parental units"  # trailing space stripped
  dev, dev_labels, dev_names, _ = read_labelled(
    [os.path.join(SST2, "dev.tsv")], "sentence", "label", labels=names
  )
  assert (len(dev), int(dev_labels.sum()), dev_names) == (872, 444, ("0", "1"))


# ---------------------------------------------------------------- rows and iterators


def test_encode_labelled_adds_bos_eos_truncates_and_pads():
  rows, n_truncated = encode_labelled(["ab", "abcdef", "abc", ""], [1, 0, 1, 0], BYTE, 5)
  a, b, c = ord("a"), ord("b"), ord("c")
  np.testing.assert_array_equal(
    rows["inputs"],
    [
      [BOS, a, b, EOS, PAD],
      [BOS, a, b, c, EOS],  # truncated
      [BOS, a, b, c, EOS],  # fits exactly
      [BOS, EOS, PAD, PAD, PAD],
    ],
  )
  np.testing.assert_array_equal(
    rows["segment_ids"], [[1, 1, 1, 1, 0], [1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
    rows["positions"], [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
  )
  np.testing.assert_array_equal(rows["labels"], [1, 0, 1, 0])
  assert n_truncated == rows.truncated["inputs"] == 1
  assert len(rows) == 4 and rows["inputs"].shape[1] == 5
  assert list(rows) == list(rows.keys()) == list(dict(rows)) == list(labelled_lib.FIELDS)
  assert all(rows[k].dtype == np.int32 for k in rows)
  with pytest.raises(ValueError, match="seq_len=1 must be >= 2"):
    encode_labelled(["a"], [0], BYTE, 1)
  with pytest.raises(ValueError, match="2 texts but label_ids has shape"):
    encode_labelled(["a", "b"], [0], BYTE, 4)


B, T = 8, 48


@pytest.fixture(scope="module")
def rows():
  texts, labels, _ = builtin_labelled("dev")
  data, _ = encode_labelled(texts[:37], labels[:37], BYTE, T)  # 37: not a multiple of B
  return data


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_shapes_epochs_and_exact_resume(rows):
  it = shuffled_batches(rows, B, seed=5, process_index=0, process_count=1)
  batches = _take(it, 10)  # 80 rows: two full epochs of 37 and a part of the third
  for b in batches:
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
      "inputs": (np.int32, (B, T)),
      "segment_ids": (np.int32, (B, T)),
      "positions": (np.int32, (B, T)),
      "labels": (np.int32, (B,)),
    }
  drawn = np.concatenate([b["inputs"] for b in batches])
  epochs = drawn[:37], drawn[37:74]
  for epoch in epochs:  # every epoch is a permutation of all rows, each reshuffled
    np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(rows["inputs"], axis=0))
  assert not np.array_equal(*epochs)
  again = shuffled_batches(rows, B, seed=5, process_index=0, process_count=1)
  _assert_batches_equal(_take(again, 10), batches)

  it = shuffled_batches(rows, B, seed=5, process_index=0, process_count=1)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
  restored = shuffled_batches(rows, B, seed=5, process_index=0, process_count=1)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 6), batches[4:])


def test_eval_iterator_is_ordered_and_pads_with_label_minus_one(rows):
  batches = list(ordered_batches(rows, B, process_index=0, process_count=1))
  assert len(batches) == 5  # ceil(37 / 8)
  got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  for k in got:
    np.testing.assert_array_equal(got[k][:37], rows[k])
  assert (got["labels"][37:] == -1).all() and (got["segment_ids"][37:] == 0).all()
  assert (got["inputs"][37:] == PAD).all() and (got["positions"][37:] == 0).all()
  assert len(list(ordered_batches(rows, B, max_batches=2, process_index=0, process_count=1))) == 2


def test_processes_get_disjoint_slices_of_the_global_batch(rows):
  for make, n in ((shuffled_batches, 6), (ordered_batches, 5)):
    whole = _take(make(rows, B, process_index=0, process_count=1), n)
    parts = [_take(make(rows, B, process_index=i, process_count=4), n) for i in range(4)]
    assert all(b["labels"].shape == (B // 4,) for p in parts for b in p)
    joined = [{k: np.concatenate([p[j][k] for p in parts]) for k in whole[j]} for j in range(n)]
    _assert_batches_equal(joined, whole)


def test_example_rows_reject_inconsistent_arrays_and_gather_fill_values():
  arrays = {"inputs": np.arange(6).reshape(3, 2), "labels": np.array([1, 0, 1])}
  rows = ExampleRows(arrays, {"inputs": 9, "labels": -1})
  batch = rows.gather(np.array([2, -1, 3]))
  np.testing.assert_array_equal(batch["inputs"], [[4, 5], [9, 9], [9, 9]])
  np.testing.assert_array_equal(batch["labels"], [1, -1, -1])
  with pytest.raises(ValueError, match="inconsistent example arrays"):
    ExampleRows({**arrays, "labels": np.array([1, 0])}, {"inputs": 9, "labels": -1})
  with pytest.raises(ValueError, match="fill values for"):
    ExampleRows(arrays, {"inputs": 9})


def test_hold_out_takes_every_kth_example_or_says_there_is_none():
  texts, labels = list("abcdefghij"), list(range(10))
  (kept_t, kept_y), (held_t, held_y) = hold_out(0.25, texts, labels)  # every 4th
  assert (held_t, held_y) == (["d", "h"], [3, 7]) and kept_t == list("abcefgij")
  assert hold_out(0.9, texts)[1] == (list("bdfhj"),)  # at least every 2nd
  for fraction in (0.0, 0.5):
    with pytest.raises(DataError, match=rf"no validation examples: .*val_fraction={fraction}"):
      hold_out(fraction, texts[:1])


def test_prepared_builtin_data_keeps_its_content_hash(tmp_path):
  # Pinned: a run resumed after a change of the data code must find the same hash.
  prepared = prepare_labelled(DataConfig(seq_len=32), str(tmp_path), write=False)
  assert prepared.sha256 == "4c13c0e3ff879e3325c1f1592f8a3975a49c910f2d77e5dc8d65b2799ccfa226"
  assert not os.listdir(tmp_path)  # write=False


# ---------------------------------------------------------------- the built-in set


def test_builtin_set_is_fixed_balanced_disjoint_and_labelled_by_adjective():
  train, train_y, names = builtin_labelled("train")
  dev, dev_y, _ = builtin_labelled("dev")
  assert names == ("negative", "positive")
  assert (len(train), len(dev)) == (2000, 500)
  assert (train_y.sum(), dev_y.sum()) == (1000, 250)
  assert not set(train) & set(dev) and len(set(train)) == 2000
  # Ordered by SHA-256, so the same on every machine; pinned to catch accidental changes.
  assert train[:2] == [
    "the story seemed very lifeless , as expected",
    "the cast was clumsy in the end",
  ]
  for text, y in zip(train + dev, np.concatenate([train_y, dev_y])):
    words = set(text.split())
    own = words & set(labelled_lib._ADJECTIVES[names[y]])
    other = words & set(labelled_lib._ADJECTIVES[names[1 - y]])
    assert len(own) == 1 and not other, text
  again = builtin_labelled("train")
  assert again[0] == train and np.array_equal(again[1], train_y)
  again[0].clear()  # callers get copies
  assert len(builtin_labelled("train")[0]) == 2000
  with pytest.raises(ValueError, match="split='test'"):
    builtin_labelled("test")


# ---------------------------------------------------------------- metrics and baseline


def test_metrics_against_hand_computation():
  # Valid rows (label -1 dropped): pred 0 0 1 1 2, labels 0 1 1 1 2 -> 4 of 5 right.
  # class 0: tp 1, fp 1, fn 0 -> F1 = 2/3; class 1: tp 2, fp 0, fn 1 -> F1 = 4/5;
  # class 2: tp 1 -> F1 = 1; class 3: never labelled nor predicted -> excluded.
  m = classification_metrics(np.array([0, 0, 1, 1, 2, 0]), np.array([0, 1, 1, 1, 2, -1]), 4)
  assert m == pytest.approx({"accuracy": 4 / 5, "macro_f1": (2 / 3 + 4 / 5 + 1) / 3}, abs=1e-12)
  # A labelled class never predicted counts with F1 = 0: (2/3 + 0) / 2.
  m = classification_metrics([0, 0], [0, 1], 2)
  assert m == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3}, abs=1e-12)
  with pytest.raises(ValueError, match="every label is -1"):
    classification_metrics([0], [-1], 2)
  with pytest.raises(ValueError, match=r"pred values must be in \[0, 2\)"):
    classification_metrics([2], [0], 2)


def test_bow_baseline_separates_a_tiny_hand_built_set():
  train = [
    "the match was won",
    "a goal in the match",
    "the team won the cup",
    "soup with bread",
    "bread and cheese",
    "a bowl of soup",
    "rain and wind today",
    "sunny with wind",
    "heavy rain tonight",
  ]
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  test = ["the team scored a goal", "cheese soup", "wind and rain", "the cup match"]
  for tokenizer in (None, BYTE):
    pred = bow_logistic_regression(train, labels, test, 3, tokenizer=tokenizer)
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(pred, [0, 1, 2, 0])


def test_bow_baseline_beats_chance_clearly_on_the_builtin_set():
  train, train_y, names = builtin_labelled("train")
  dev, dev_y, _ = builtin_labelled("dev")
  pred = bow_logistic_regression(train, train_y, dev, len(names))
  # Chance is 0.5; every dev adjective occurs in training, so a linear model should be near 1.
  m = classification_metrics(pred, dev_y, len(names))
  assert m["accuracy"] >= 0.95 and m["macro_f1"] >= 0.95, m
  np.testing.assert_array_equal(bow_logistic_regression(train, train_y, dev, 2), pred)


def test_logistic_regression_on_dense_features_matches_sparse_and_separates_blobs():
  rng = np.random.default_rng(0)
  y = np.arange(60) % 3
  centres = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
  x = centres[y] + rng.normal(size=(60, 3))
  dense = logistic_regression(x[:45], y[:45], x[45:], 3)
  assert dense.dtype == np.int32
  np.testing.assert_array_equal(dense, y[45:])  # blobs 3 sd apart
  sparse = logistic_regression(
    scipy.sparse.csr_matrix(x[:45]), y[:45], scipy.sparse.csr_matrix(x[45:]), 3
  )
  np.testing.assert_array_equal(sparse, dense)
  with pytest.raises(ValueError, match="train labels"):
    logistic_regression(x[:3], np.array([0, 1, 3]), x, 3)
