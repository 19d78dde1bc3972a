"""Text-to-text data and metrics: readers and bad input, the fixed task splits, teacher-forcing
rows, resumable iterators, BLEU/ROUGE/SQuAD EM-F1 against hand computations, lead-3."""

import json
import math
import os

import numpy as np
import pytest

from llm_mp.data import ByteTokenizer, DataError
from llm_mp.data import text2text as t2t
from llm_mp.text_metrics import bleu, lead3, normalize_answer, rouge, sentences, squad_em_f1

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
BYTE = ByteTokenizer()
PAD, BOS, EOS = BYTE.pad_id, BYTE.bos_id, BYTE.eos_id
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  return str(path)


# ---------------------------------------------------------------- parallel files


def test_parallel_files_align_by_newline_only(tmp_path):
  # CRLF endings, a U+2028 inside a line (str.splitlines would split there and misalign), a
  # final newline that opens no extra line, NFC cleaning.
  src = _write(tmp_path / "a.de", "eins\r\nzwei\u2028halb\r\ncafe\u0301\r\n")
  tgt = _write(tmp_path / "a.en", "one\ntwo\u2028half\ncoffee")
  split, skipped = t2t.read_parallel(src, tgt)
  assert split.inputs == ["eins", "zwei\u2028halb", "caf\u00e9"]
  assert split.targets == ["one", "two\u2028half", "coffee"]
  assert split.references == [["one"], ["two\u2028half"], ["coffee"]] and skipped == 0


def test_misaligned_parallel_files_name_both_files_and_counts(tmp_path):
  src = _write(tmp_path / "a.de", "a\nb\nc\n")
  tgt = _write(tmp_path / "a.en", "a\nb\n")
  with pytest.raises(
    DataError,
    match=rf"^misaligned parallel files: {src} has 3 lines but "
    rf"{tgt} has 2$",
  ):
    t2t.read_parallel(src, tgt)


def test_parallel_empty_lines_error_or_skip(tmp_path):
  src = _write(tmp_path / "a.de", "a\n \nc\nd\n")
  tgt = _write(tmp_path / "a.en", "A\nB\nC\n\x07\n")  # line 4 is empty after cleaning
  with pytest.raises(DataError, match=rf"^{src}:2: empty line"):
    t2t.read_parallel(src, tgt)
  split, skipped = t2t.read_parallel(src, tgt, bad_rows="skip")
  assert (split.inputs, split.targets, skipped) == (["a", "c"], ["A", "C"], 2)
  ok = _write(tmp_path / "b.de", "a\nb\nc\nd\n")
  with pytest.raises(DataError, match=rf"^{tgt}:4: empty line"):
    t2t.read_parallel(ok, tgt)
  empty = _write(tmp_path / "e.de", " \n")
  with pytest.raises(DataError, match=r"no examples in .* \(1 bad pair\(s\) skipped\)"):
    t2t.read_parallel(empty, _write(tmp_path / "e.en", "x\n"), bad_rows="skip")


def test_parallel_missing_file_non_utf8_and_bad_mode(tmp_path):
  src = _write(tmp_path / "a.de", "a\n")
  with pytest.raises(DataError, match=r"^parallel target file not found: .*nope\.en$"):
    t2t.read_parallel(src, str(tmp_path / "nope.en"))
  bad = _write(tmp_path / "b.en", b"ok\n\xff\n")
  with pytest.raises(DataError, match=rf"^{bad}: not valid UTF-8 \(first bad byte at offset 3\)"):
    t2t.read_parallel(src, bad)
  with pytest.raises(ValueError, match=r"data.bad_rows='drop' must be"):
    t2t.read_parallel(src, src, bad_rows="drop")


# ---------------------------------------------------------------- JSONL


def test_jsonl_fields_and_reference_lists(tmp_path):
  rows = [{"src": "hallo", "tgt": "hello"}, {"src": "frage", "tgt": ["a1", " a2 "], "x": 1}]
  path = _write(tmp_path / "a.jsonl", "\n\n".join(json.dumps(r) for r in rows) + "\n")
  split, skipped = t2t.read_text2text_jsonl([path, path], "src", "tgt")
  assert split.inputs == ["hallo", "frage"] * 2
  assert split.targets == ["hello", "a1"] * 2  # the first reference is the training target
  assert split.references == [["hello"], ["a1", "a2"]] * 2 and skipped == 0


BAD_JSONL = [  # (bad line 2, expected problem)
  ("{not json", "invalid JSON"),
  ("[1, 2]", "expected a JSON object, found list"),
  ('{"target": "t"}', "missing field 'input'"),
  ('{"input": " ", "target": "t"}', "field 'input' is empty"),
  ('{"input": "i", "target": 3}', "field 'target' is not a string: 3"),
  ('{"input": "i", "target": []}', "field 'target' is an empty list"),
  ('{"input": "i", "target": ["ok", null]}', "missing field 'target'"),
]


@pytest.mark.parametrize("line,problem", BAD_JSONL)
def test_jsonl_bad_rows_name_file_and_line_or_are_skipped(tmp_path, line, problem):
  good = json.dumps({"input": "i", "target": "t"})
  path = _write(tmp_path / "a.jsonl", f"{good}\n{line}\n{good}\n")
  with pytest.raises(DataError, match=rf"^{path}:2: {problem}"):
    t2t.read_text2text_jsonl(path)
  split, skipped = t2t.read_text2text_jsonl(path, bad_rows="skip")
  assert (split.inputs, split.targets, skipped) == (["i", "i"], ["t", "t"], 1)


# ---------------------------------------------------------------- the three tasks


@needs_data
def test_task_splits_have_the_documented_sizes_and_are_disjoint():
  # Computed once from the files and pinned (also documented in llm_mp/data/text2text.py).
  sizes = {
    "translate": (29_000, 1_014, 1_000),
    "summarize": (1_765, 244, 216),
    "qa": (8_391, 601, 1_578),
  }
  loaded = {task: {s: t2t.load_task_data(task, s, DATA) for s in t2t.SPLITS} for task in sizes}
  for task, expected in sizes.items():
    got = tuple(len(loaded[task][s].inputs) for s in t2t.SPLITS)
    assert got == expected == tuple(t2t.SPLIT_SIZES[task][s] for s in t2t.SPLITS), task
    for split in loaded[task].values():
      assert len(split.targets) == len(split.references) == len(split.inputs)
      assert all(r[0] == t for r, t in zip(split.references, split.targets))
  first = loaded["translate"]["train"]
  assert first.inputs[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
  assert first.targets[0] == "Two young, White males are outside near many bushes."
  # SQuAD 10,570 questions with 34,726 gold answers in all; no paragraph in two splits.
  qa = loaded["qa"]
  assert sum(len(r) for s in qa.values() for r in s.references) == 34_726
  contexts = {s: {x.split(" context: ", 1)[1] for x in qa[s].inputs} for s in qa}
  assert not contexts["train"] & contexts["test"] and not contexts["validation"] & (
    contexts["train"] | contexts["test"]
  )
  assert (
    qa["test"]
    .inputs[0]
    .startswith(
      "question: What was Maria Curie the first female "
      "recipient of? context: One of the most famous"
    )
  )
  assert qa["test"].references[0] == ["Nobel Prize"] * 3
  # BBC: duplicate articles stay on one side; summaries get their sentence spaces back.
  bbc = loaded["summarize"]
  articles = {s: set(bbc[s].inputs) for s in bbc}
  assert not articles["train"] & articles["test"] and not articles["validation"] & (
    articles["train"] | articles["test"]
  )
  assert len(bbc["train"].inputs) - len(articles["train"]) > 0  # duplicates exist, in train
  assert "from $10.9bn. For the full-year" in bbc["test"].targets[0]


def test_fix_summary_spacing_uses_the_article():
  article = (
    'Title\n\nProfits rose to $10.9bn. For the year, fine.\n\nHe said it "went well". '
    'Sales at the U.S. unit grew. Markets were "tuned". The end. Analysts were calm. '
    '"I think so," he said.'
  )
  summary = (
    'Profits rose to $10.9bn.For the year, fine.He said it "went well".Sales at the '
    'U.S. unit grew.Analysts were calm."I think so," he said.'
  )
  assert t2t.fix_summary_spacing(summary, article) == (
    'Profits rose to $10.9bn. For the year, fine. He said it "went well". Sales at the '
    'U.S. unit grew. Analysts were calm. "I think so," he said.'
  )


def test_load_task_data_rejects_unknown_names(tmp_path):
  with pytest.raises(ValueError, match=r"task='mt' must be one of"):
    t2t.load_task_data("mt", "train", str(tmp_path))
  with pytest.raises(ValueError, match=r"split='dev' must be one of"):
    t2t.load_task_data("qa", "dev", str(tmp_path))
  with pytest.raises(ValueError, match=r"direction='de-fr' must be"):
    t2t.load_task_data("translate", "test", str(tmp_path), direction="de-fr")
  with pytest.raises(DataError, match=r"parallel source file not found: .*test_2016_flickr\.en"):
    t2t.load_task_data("translate", "test", str(tmp_path), direction="en-de")


# ---------------------------------------------------------------- tokenizers and rows


def test_rows_by_hand():
  # Sources: "ab" fits with EOS; "abcdef" is cut to S=5 (EOS lost). Targets with T=3: "xyz" is
  # cut (EOS lost); "q" is q EOS pad.
  rows = t2t.encode_text2text(["ab", "abcdef"], ["xyz", "q"], BYTE, BYTE, 5, 3)
  a, b, c, d, e, q, x, y, z = (ord(ch) for ch in "abcdeqxyz")
  np.testing.assert_array_equal(rows["inputs"], [[a, b, EOS, PAD, PAD], [a, b, c, d, e]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(rows["targets"], [[x, y, z], [q, EOS, -1]])
  np.testing.assert_array_equal(rows["decoder_inputs"], [[BOS, x, y], [BOS, q, PAD]])
  np.testing.assert_array_equal(rows["decoder_segment_ids"], [[1, 1, 1], [1, 1, 0]])
  assert all(rows[k].dtype == np.int32 for k in t2t.FIELDS)
  assert (rows.truncated_sources, rows.truncated_targets) == (1, 1)
  assert (len(rows), rows.source_len, rows.target_len) == (2, 5, 3)
  with pytest.raises(ValueError, match=r"2 sources but 1 targets"):
    t2t.encode_text2text(["a", "b"], ["c"], BYTE, BYTE, 4, 4)
  with pytest.raises(ValueError, match=r"source_len=0 and target_len=4 must be >= 1"):
    t2t.encode_text2text(["a"], ["c"], BYTE, BYTE, 0, 4)


def test_shared_and_separate_bpe_tokenizers_round_trip(tmp_path):
  sources = ["der Hund läuft schnell"] * 20 + ["die Katze schläft"] * 20
  targets = ["the dog runs fast"] * 20 + ["the cat sleeps"] * 20
  src, tgt = t2t.build_text2text_tokenizers(sources, targets, "bpe", 300, shared=True)
  assert src is tgt
  assert len(src.encode("the dog runs fast")) < len("the dog runs fast")  # merges learned
  t2t.save_text2text_tokenizers(str(tmp_path / "shared"), src, tgt)
  s2, t2 = t2t.load_text2text_tokenizers(str(tmp_path / "shared"))
  assert s2.to_json() == t2.to_json() == src.to_json()
  assert not os.path.exists(tmp_path / "shared" / "target")
  src, tgt = t2t.build_text2text_tokenizers(sources, targets, "bpe", 300, shared=False)
  assert src.to_json() != tgt.to_json()
  assert (src.pad_id, src.bos_id, src.eos_id) == (tgt.pad_id, tgt.bos_id, tgt.eos_id) == (0, 1, 2)
  t2t.save_text2text_tokenizers(str(tmp_path / "sep"), src, tgt)
  s2, t2 = t2t.load_text2text_tokenizers(str(tmp_path / "sep"))
  assert (s2.to_json(), t2.to_json()) == (src.to_json(), tgt.to_json())
  rows = t2t.encode_text2text(sources[:1], targets[:1], s2, t2, 16, 16)
  n = int(rows["decoder_segment_ids"][0].sum())
  assert t2.decode(rows["targets"][0, :n]) == targets[0]  # EOS (a special) is dropped
  assert rows["targets"][0, n - 1] == t2.eos_id and rows["decoder_inputs"][0, 0] == t2.bos_id
  with pytest.raises(ValueError, match=r"kind='word' must be"):
    t2t.build_text2text_tokenizers(sources, targets, "word")


# ---------------------------------------------------------------- iterators


def _rows(n=7):
  return t2t.encode_text2text(
    [f"s{i}" for i in range(n)], [f"t{i}" * (i % 3 + 1) for i in range(n)], BYTE, BYTE, 6, 8
  )


def test_train_iterator_resumes_exactly_and_slices_by_process():
  rows = _rows()
  it = t2t.make_text2text_train_iterator(rows, 4, seed=3)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses epoch boundaries (7 rows, 4 per batch)
  resumed = t2t.make_text2text_train_iterator(rows, 4, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(resumed)
    assert got.keys() == set(t2t.FIELDS)
    for k in t2t.FIELDS:
      np.testing.assert_array_equal(got[k], want[k])
  assert expected[0]["inputs"].shape == (4, 6) and expected[0]["targets"].shape == (4, 8)
  # Two processes' slices concatenate to the global batch.
  full = next(t2t.make_text2text_train_iterator(rows, 4, seed=3))
  halves = [
    next(t2t.make_text2text_train_iterator(rows, 4, seed=3, process_index=p, process_count=2))
    for p in range(2)
  ]
  for k in t2t.FIELDS:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])


def test_eval_iterator_is_ordered_and_padded():
  rows = _rows(5)
  batches = list(t2t.make_text2text_eval_iterator(rows, 2))
  assert len(batches) == 3
  for k in t2t.FIELDS:
    got = np.concatenate([b[k] for b in batches])
    np.testing.assert_array_equal(got[:5], rows[k])
  last = batches[-1]
  np.testing.assert_array_equal(last["targets"][1], -1)
  np.testing.assert_array_equal(last["segment_ids"][1], 0)
  np.testing.assert_array_equal(last["decoder_segment_ids"][1], 0)
  np.testing.assert_array_equal(last["inputs"][1], PAD)
  assert len(list(t2t.make_text2text_eval_iterator(rows, 2, max_batches=2))) == 2


# ---------------------------------------------------------------- metrics


def test_squad_normalisation_and_em_f1_by_hand():
  assert normalize_answer("  The U.S.-led   Alliance!") == "usled alliance"
  assert normalize_answer("Theatre of an era") == "theatre of era"  # whole words only
  preds = ["The Denver Broncos!", "in the year 1990", "Paris", "a b b b c"]
  golds = [["Denver Broncos", "Broncos"], ["1990", "year 1990"], ["London"], ["the b b"]]
  # 1: exact after normalisation. 2: "in year 1990" vs "year 1990": P 2/3, R 1, F1 0.8 (better
  # than vs "1990": 0.5). 3: nothing shared. 4: articles go, so "b b b c" vs "b b": counts
  # clipped to 2 common tokens, P 2/4, R 2/2, F1 2/3.
  got = squad_em_f1(preds, golds)
  assert got["exact_match"] == pytest.approx(100 * 1 / 4, abs=1e-12)  # float sums of 4 terms
  assert got["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 2 / 3) / 4, abs=1e-12)
  with pytest.raises(ValueError, match=r"golds_list\[0\]='x' must be a non-empty list"):
    squad_em_f1(["x"], ["x"])
  with pytest.raises(ValueError, match=r"squad_em_f1: 1 predictions but 2 references"):
    squad_em_f1(["x"], [["x"], ["y"]])


def test_rouge_by_hand():
  # Tokens: ref [the cat sat the dog ran], hyp [the cat ran]. ROUGE-1: 3 clipped matches, P 1,
  # R 1/2, F 2/3. ROUGE-2: hyp {the cat, cat ran}, 1 of 5 ref bigrams: P 1/2, R 1/5, F 2/7.
  # ROUGE-L: LCS 3 -> F 2/3. Second pair: stemming maps dogs/dog and running/runs to one stem.
  got = rouge(["The cat ran.", "Dogs running"], ["The cat sat. The dog ran.", "dog runs"])
  tol = 1e-9  # float arithmetic of a few divisions
  assert got["rouge1"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=tol)
  assert got["rouge2"] == pytest.approx(100 * (2 / 7 + 1) / 2, abs=tol)
  assert got["rougeL"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=tol)


def test_bleu_by_hand():
  tol = 1e-9  # sacrebleu sums logs in float64
  assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100, abs=tol)
  # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
  assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
    100 * (1 / 12) ** 0.25, abs=tol
  )
  # Corpus BLEU pools counts: precisions 9/10, 6/8, 4/6, 2/4; lengths 10 vs 12: BP exp(-0.2).
  got = bleu(
    ["the cat sat on the mat", "the cat sat on"], ["the cat sat on a mat", "the cat sat on the mat"]
  )
  assert got == pytest.approx(100 * math.exp(-0.2) * (0.9 * 0.75 * (4 / 6) * 0.5) ** 0.25, abs=tol)
  with pytest.raises(ValueError, match=r"bleu: no predictions"):
    bleu([], [])


def test_lead3_by_hand():
  article = (
    'Headline here\n\nFirst sentence, with 3.5 numbers. He said "stop." Then we left!\n'
    "New para? Fifth."
  )
  assert sentences(article) == [
    "Headline here",
    "First sentence, with 3.5 numbers.",
    'He said "stop."',
    "Then we left!",
    "New para?",
    "Fifth.",
  ]
  assert lead3(article) == 'Headline here First sentence, with 3.5 numbers. He said "stop."'
  assert lead3(article, skip_title=True) == (
    'First sentence, with 3.5 numbers. He said "stop." Then we left!'
  )
  assert lead3("One line only", skip_title=True) == ""


@needs_data
def test_lead3_rouge_on_the_bbc_test_split():
  # The summarisation baseline, pinned to 3 decimals: on the first 100 test articles, the
  # ones `python -m experiments.seq2seq --task summarize` decodes, it is the lead-3 row of
  # docs/seq2seq.md (48.27 / 39.77 / 38.56); on all 216, lower.
  test = t2t.load_task_data("summarize", "test", DATA)
  expected = {
    100: {"rouge1": 48.273, "rouge2": 39.770, "rougeL": 38.564},
    216: {"rouge1": 45.254, "rouge2": 36.564, "rougeL": 35.466},
  }
  assert len(test.inputs) == 216
  for n, want in expected.items():
    got = rouge([lead3(a, skip_title=True) for a in test.inputs[:n]], test.targets[:n])
    for k, v in want.items():
      assert got[k] == pytest.approx(v, abs=1e-3), (n, k)
