"""Text-to-text data and metrics: readers and bad input, field options, teacher-forcing rows,
resumable iterators, BLEU/ROUGE/SQuAD EM-F1 against hand computations, lead-3."""

import json
import math
import os

import numpy as np
import pytest

from llm_mp.config import DataConfig
from llm_mp.data import ByteTokenizer, DataError, ordered_batches, shuffled_batches
from llm_mp.data import text2text as t2t
from llm_mp.text_metrics import (
  bleu,
  lead3,
  normalize_answer,
  rouge,
  rouge_paired_minus_shuffled,
  sentences,
  squad_em_f1,
)

BYTE = ByteTokenizer()
PAD, BOS, EOS = BYTE.pad_id, BYTE.bos_id, BYTE.eos_id


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


def test_a_run_reads_jsonl_fields_named_in_the_config(tmp_path):
  # {"article", "summary"} rows need no conversion: data.source_field / data.target_field.
  rows = [{"article": f"article {i}", "summary": f"summary {i}"} for i in range(10)]
  path = _write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  cfg = DataConfig(
    paths=(path,), source_field="article", target_field="summary", val_fraction=0.2, seq_len=16
  )
  prepared = t2t.prepare_text2text(cfg, str(tmp_path / "run"))
  assert prepared.val_split.inputs == ["article 4", "article 9"]  # every 5th pair held out
  assert prepared.val_split.targets == ["summary 4", "summary 9"] and len(prepared.train) == 8
  with pytest.raises(DataError, match=rf"^{path}:1: missing field 'input'"):
    t2t.prepare_text2text(DataConfig(paths=(path,)), str(tmp_path / "run2"))
  with pytest.raises(DataError, match=r"give .jsonl files with article/summary fields"):
    t2t.read_pairs([path, str(tmp_path / "b.txt")], source_field="article", target_field="summary")


def test_prepared_pairs_keep_their_content_hash_and_check_the_run_tokenizer(tmp_path):
  path = _write(
    tmp_path / "a.jsonl",
    "".join(
      json.dumps({"input": f"frage {i}", "target": [f"a{i}", f"b{i}"]}) + "\n" for i in range(50)
    ),
  )
  run = str(tmp_path / "run")
  prepared = t2t.prepare_text2text(DataConfig(paths=(path,), val_paths=(path,), seq_len=16), run)
  # Pinned: a run resumed after a change of the data code must find the same hash.
  assert prepared.sha256 == "7dbd843e64025198c2e632cb28a07de457ec615334b8ceec39f7e67b83fd31f8"
  with pytest.raises(DataError, match=r"holds a byte tokenizer but data.tokenizer='bpe'"):
    t2t.prepare_text2text(DataConfig(paths=(path,), tokenizer="bpe"), run)


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
  assert rows.truncated == {"inputs": 1, "targets": 1}
  assert (len(rows), rows["inputs"].shape[1], rows["targets"].shape[1]) == (2, 5, 3)
  with pytest.raises(ValueError, match=r"2 sources but 1 targets"):
    t2t.encode_text2text(["a", "b"], ["c"], BYTE, BYTE, 4, 4)
  with pytest.raises(ValueError, match=r"source_len=0 and target_len=4 must be >= 1"):
    t2t.encode_text2text(["a"], ["c"], BYTE, BYTE, 0, 4)


@pytest.mark.parametrize(
  "n, fraction, mean_span", [(2, 0.15, 3.0), (10, 0.3, 2.0), (40, 0.15, 3.0)]
)
def test_span_mask_masks_the_configured_fraction_in_separate_spans(n, fraction, mean_span):
  rng = np.random.default_rng(0)
  masked = min(max(round(fraction * n), 1), n - 1)
  spans = min(max(round(masked / mean_span), 1), masked, n - masked)
  starts = set()
  for _ in range(50):
    mask = t2t.span_noise_mask(n, fraction, mean_span, rng)
    assert mask.shape == (n,) and mask.dtype == bool and mask.sum() == masked
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int)])) == 1)
    assert len(edges) == spans  # separate spans: a kept word between any two
    starts.add(int(edges[0]))
  assert n < 10 or len(starts) > 1  # spans fall anywhere, the chunk's start included


def test_denoising_pairs_are_clean_targets_and_deterministic_per_seed():
  words = [f"w{i}" for i in range(45)]
  texts = [" ".join(words), "one  two\nthree", "single"]
  split = t2t.denoising_pairs(texts, 20, mask_fraction=0.2, mean_span=2.0, seed=3)
  # chunks of 20, 20, 5 words and "one two three"; a one-word text gives no chunk
  assert split.targets == [
    " ".join(words[:20]),
    " ".join(words[20:40]),
    " ".join(words[40:]),
    "one two three",
  ]
  assert split.references == [[t] for t in split.targets]
  for x, y in zip(split.inputs, split.targets):
    clean = y.split()
    masked = min(max(round(0.2 * len(clean)), 1), len(clean) - 1)
    kept = [w for w in x.split() if w != "<mask>"]
    assert len(kept) == len(clean) - masked  # the configured fraction of the words
    assert [w for w in clean if w in kept] == kept  # the rest, in order
    assert "<mask> <mask>" not in x  # one mask per span
  assert t2t.denoising_pairs(texts, 20, 0.2, 2.0, seed=3) == split
  assert t2t.denoising_pairs(texts, 20, 0.2, 2.0, seed=4).inputs != split.inputs
  with pytest.raises(ValueError, match="mask_fraction"):
    t2t.denoising_pairs(texts, 20, mask_fraction=1.0)


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
  it = shuffled_batches(rows, 4, seed=3)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses epoch boundaries (7 rows, 4 per batch)
  resumed = shuffled_batches(rows, 4, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(resumed)
    assert got.keys() == set(t2t.FIELDS)
    for k in t2t.FIELDS:
      np.testing.assert_array_equal(got[k], want[k])
  assert expected[0]["inputs"].shape == (4, 6) and expected[0]["targets"].shape == (4, 8)
  # Two processes' slices concatenate to the global batch.
  full = next(shuffled_batches(rows, 4, seed=3))
  halves = [
    next(shuffled_batches(rows, 4, seed=3, process_index=p, process_count=2)) for p in range(2)
  ]
  for k in t2t.FIELDS:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])


def test_eval_iterator_is_ordered_and_padded():
  rows = _rows(5)
  batches = list(ordered_batches(rows, 2))
  assert len(batches) == 3
  for k in t2t.FIELDS:
    got = np.concatenate([b[k] for b in batches])
    np.testing.assert_array_equal(got[:5], rows[k])
  last = batches[-1]
  np.testing.assert_array_equal(last["targets"][1], -1)
  np.testing.assert_array_equal(last["segment_ids"][1], 0)
  np.testing.assert_array_equal(last["decoder_segment_ids"][1], 0)
  np.testing.assert_array_equal(last["inputs"][1], PAD)
  assert len(list(ordered_batches(rows, 2, max_batches=2))) == 2


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


def test_paired_minus_shuffled_rouge_by_hand():
  refs = ["the cat sat on the mat", "stocks fell sharply in london", "rain is expected today"]
  # Each output copies two bigrams of its own reference: 2 of 5, 2 of 4, 2 of 3 bigrams.
  hyps = ["the cat sat", "stocks fell sharply", "rain is expected"]
  f = lambda p, r: 2 * p * r / (p + r)
  paired = 100 * (f(1, 2 / 5) + f(1, 2 / 4) + f(1, 2 / 3)) / 3
  got = rouge_paired_minus_shuffled(hyps, refs)
  assert got["paired"] == pytest.approx(paired)
  assert got["shuffled"] == 0.0  # no output shares a bigram with another article's summary
  assert got["difference"] == pytest.approx(paired)
  # Output that fits every reference equally (the summaries' language) reads nothing.
  same = rouge_paired_minus_shuffled(["the cat sat"] * 3, ["the cat sat"] * 3)
  assert same == {"paired": 100.0, "shuffled": 100.0, "difference": 0.0}
  with pytest.raises(ValueError, match="at least 2"):
    rouge_paired_minus_shuffled(["a"], ["a"])


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
