"""Text-to-text data: parallel readers, the three seq2seq tasks' fixed splits, rows, iterators.

Typical use by an encoder-decoder run::

  train = load_task_data("translate", "train")          # TaskSplit(inputs, targets, references)
  test = load_task_data("translate", "test")
  src_tok, tgt_tok = build_text2text_tokenizers(train.inputs, train.targets, "bpe", 8000)
  rows = encode_text2text(train.inputs, train.targets, src_tok, tgt_tok, 64, 64)
  it = make_text2text_train_iterator(rows, batch_size=32, seed=0)
  batch = next(it)  # {"inputs", "segment_ids"}: int32[B, S];
                    # {"decoder_inputs", "decoder_segment_ids", "targets"}: int32[B, T]

Readers (each text is cleaned as everywhere in llm_mp: NFC, no control
characters, outer whitespace stripped):

* :func:`read_parallel`: two aligned plain-text files, one example per line
  (``\\n`` ends a line; a ``\\r`` before it is dropped; other Unicode line
  separators are text, so they cannot misalign the files). Files with
  different line counts are a :class:`DataError` naming both files and counts.
* :func:`read_text2text_jsonl`: one JSON object per line with an input field
  and a target field (names configurable); the target is a string, or a
  non-empty list of strings (several references; the first is the training
  target). Blank lines are skipped.

A bad row (an empty line on either side, invalid JSON, a missing, empty or
non-string field) raises ``DataError("<file>:<line>: <problem>")``, or with
``bad_rows="skip"`` is dropped and counted, as in :mod:`llm_mp.data.labelled`.

The three tasks (:func:`load_task_data`, files under ``root``, by default
``../shared/data``; see ``shared/data/SOURCES.md``). Every split is fixed by
the files and by SHA-256 digests, never by a random generator, so it is the
same on every machine and Python version; ``SPLIT_SIZES`` pins the sizes:

* ``"translate"``: Multi30k task 1, German -> English by default
  (``direction="en-de"`` reverses it). ``train`` = ``train.{de,en}`` (29,000),
  ``validation`` = ``val.*`` (1,014), ``test`` = ``test_2016_flickr.*`` (1,000),
  the splits on which published Multi30k BLEU is reported.
* ``"summarize"``: BBC News Summary, article -> summary. No official split:
  an example's split is the first 8 bytes of the SHA-256 of its article (the
  UTF-8 text as in the file), a big-endian integer, mod 10: 0 -> ``test``,
  1 -> ``validation``, otherwise ``train`` (about 10/10/80%). Hashing the
  article rather than the id keeps the 98 pairs of duplicate articles on the
  same side. Sizes: train 1,765, validation 244, test 216. Examples keep the
  file's id order. The input is the whole article (its first line is the
  title); the summaries' sentences are joined without a space in the files
  (``"$10.9bn.For"``), so the space is put back where the article shows a
  sentence join (:func:`fix_summary_spacing`).
* ``"qa"``: SQuAD v1.1 dev (only the dev set is available), split by article
  so no paragraph is in two splits: the 48 articles sorted by the SHA-256 of
  their title, the first 10 -> ``test``, the next 4 -> ``validation``, the
  other 34 -> ``train``. Sizes (questions): train 8,391, validation 601, test
  1,578 (gold answers: 27,453 / 1,797 / 5,476). The small validation split
  serves in-training evaluation, so ``test`` is scored only at the end.
  Input ``"question: <q> context: <paragraph>"``, target the first gold
  answer, references all gold answers (duplicates kept, as the official
  script keeps them; its max over golds makes them harmless).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from llm_mp.config import TOKENIZERS
from llm_mp.data.corpus import _decode, clean_text
from llm_mp.data.files import DataError
from llm_mp.data.pipeline import ordered_batches, shuffled_batches
from llm_mp.data.tokenizer import (
  TOKENIZER_FILE,
  BpeTokenizer,
  ByteTokenizer,
  Tokenizer,
  load_tokenizer,
)

DEFAULT_ROOT = os.path.join("..", "shared", "data")
TASKS = ("translate", "summarize", "qa")
SPLITS = ("train", "validation", "test")
FIELDS = ("inputs", "segment_ids", "decoder_inputs", "decoder_segment_ids", "targets")
# Sizes of the fixed splits, pinned by tests/test_text2text.py.
SPLIT_SIZES = {
  "translate": {"train": 29_000, "validation": 1_014, "test": 1_000},
  "summarize": {"train": 1_765, "validation": 244, "test": 216},
  "qa": {"train": 8_391, "validation": 601, "test": 1_578},
}
QA_SPLIT_ARTICLES = {"test": 10, "validation": 4}  # the rest (34 of 48) is train
TARGET_TOKENIZER_DIR = "target"  # a separate target tokenizer lives in <dir>/target/


class TaskSplit(NamedTuple):
  """Examples of one split: ``inputs[i] -> targets[i]``, scored against ``references[i]``.

  ``targets`` are the training targets; ``references`` the texts a metric
  compares with (a one-element list except SQuAD, whose questions have 1-6
  gold answers, the first being ``targets[i]``).
  """

  inputs: list[str]
  targets: list[str]
  references: list[list[str]]


class _BadRow(Exception):
  """A problem with one row; turned into a DataError or a skip by the caller."""


def _check_bad_rows(bad_rows: str) -> None:
  if bad_rows not in ("error", "skip"):
    raise ValueError(f"data.bad_rows={bad_rows!r} must be 'error' or 'skip'")


def _read(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f"{what} file not found: {path}")
  return _decode(path)


# ---------------------------------------------------------------- readers


def _lines(text: str) -> list[str]:
  """Lines split at ``\\n`` only (a final newline ends the last line, it opens no new one)."""
  if not text:
    return []
  lines = text.removesuffix("\n").split("\n")
  return [line.removesuffix("\r") for line in lines]


def read_parallel(
  source_path: str, target_path: str, bad_rows: str = "error"
) -> tuple[TaskSplit, int]:
  """Reads two aligned files: line ``i`` of ``source_path`` translates to line ``i`` of the other.

  Args:
    source_path, target_path: UTF-8 text files, one example per line.
    bad_rows: ``"error"`` raises on a line that is empty (after cleaning) on
      either side; ``"skip"`` drops the pair and counts it.

  Returns:
    ``(split, skipped)``: a :class:`TaskSplit` of cleaned texts and the number
    of pairs skipped.

  Raises:
    DataError: a missing or non-UTF-8 file, different line counts (naming both
      files and both counts), an empty line with ``bad_rows="error"``
      (``"<file>:<line>: ..."``), or no examples at all.
  """
  _check_bad_rows(bad_rows)
  src = _lines(_read(source_path, "parallel source"))
  tgt = _lines(_read(target_path, "parallel target"))
  if len(src) != len(tgt):
    raise DataError(
      f"misaligned parallel files: {source_path} has {len(src)} lines but "
      f"{target_path} has {len(tgt)}"
    )
  inputs, targets, skipped = [], [], 0
  for lineno, (s, t) in enumerate(zip(src, tgt), 1):
    s, t = clean_text(s)[0], clean_text(t)[0]
    if not s or not t:
      if bad_rows == "error":
        path = source_path if not s else target_path
        raise DataError(f"{path}:{lineno}: empty line (data.bad_rows='skip' skips such pairs)")
      skipped += 1
      continue
    inputs.append(s)
    targets.append(t)
  if not inputs:
    raise DataError(f"no examples in {source_path} / {target_path} ({skipped} bad pair(s) skipped)")
  return TaskSplit(inputs, targets, [[t] for t in targets]), skipped


def _field_text(record: dict, field: str) -> str:
  value = record.get(field)
  if value is None:
    raise _BadRow(f"missing field {field!r}")
  if not isinstance(value, str):
    raise _BadRow(f"field {field!r} is not a string: {value!r}")
  cleaned = clean_text(value)[0]
  if not cleaned:
    raise _BadRow(f"field {field!r} is empty")
  return cleaned


def _references(record: dict, field: str) -> list[str]:
  value = record.get(field)
  if isinstance(value, list):
    if not value:
      raise _BadRow(f"field {field!r} is an empty list")
    return [_field_text({field: v}, field) for v in value]
  return [_field_text(record, field)]


def read_text2text_jsonl(
  paths: str | Sequence[str],
  input_field: str = "input",
  target_field: str = "target",
  bad_rows: str = "error",
) -> tuple[TaskSplit, int]:
  """Reads ``.jsonl`` files of ``{input_field: str, target_field: str | [str, ...]}`` objects.

  Args:
    paths: one file or several, read in order.
    input_field, target_field: the keys of the input and target texts.
    bad_rows: ``"error"`` or ``"skip"`` (see the module docstring).

  Returns:
    ``(split, skipped)``: a :class:`TaskSplit` (a list target gives all its
    strings as references and its first as the training target) and the
    number of bad rows skipped.

  Raises:
    DataError: a missing or non-UTF-8 file, a bad row with ``bad_rows="error"``
      (``"<file>:<line>: <problem>"``), or no examples at all.
  """
  _check_bad_rows(bad_rows)
  paths = (paths,) if isinstance(paths, str) else tuple(paths)
  inputs, refs, skipped = [], [], 0
  for path in paths:
    for lineno, line in enumerate(_lines(_read(path, "text-to-text")), 1):
      if not line.strip():
        continue
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise _BadRow(f"invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
          raise _BadRow(f"expected a JSON object, found {type(record).__name__}")
        example = _field_text(record, input_field), _references(record, target_field)
      except _BadRow as e:
        if bad_rows == "error":
          raise DataError(f"{path}:{lineno}: {e} (data.bad_rows='skip' skips such rows)") from None
        skipped += 1
        continue
      inputs.append(example[0])
      refs.append(example[1])
  if not inputs:
    raise DataError(
      f"no examples in {', '.join(paths) or 'no files'} ({skipped} bad row(s) skipped)"
    )
  return TaskSplit(inputs, [r[0] for r in refs], refs), skipped


# ---------------------------------------------------------------- the three tasks


def _bucket(text: str, buckets: int) -> int:
  """A platform-independent bucket: the first 8 bytes of ``text``'s SHA-256, mod ``buckets``."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % buckets


_WHITESPACE = re.compile(r"\s+")
_JOIN_WINDOW = 12  # characters each side of a join that must match the article


def fix_summary_spacing(summary: str, article: str) -> str:
  """Puts back the space the BBC summaries lack between sentences: ``"bn.For"`` -> ``"bn. For"``.

  The summaries are extractive and their sentences are joined without a space,
  so a join is found by the article: a space is inserted at a point right
  after ``.``, ``!``, ``?`` or a quote when the 12 characters before it end a
  sentence in the article (are followed there by whitespace), the 12 after it
  begin one (follow whitespace), and the text with no space does not occur in
  the article. This tells ``'months."I think'`` (-> ``'months. "I think'``)
  from ``'"tuned".The'`` (-> ``'"tuned". The'``) and keeps ``"U.S."``,
  ``"10.9bn"`` and ``"A.D.,"`` whole. A sentence not found verbatim in the
  article (about 1%) keeps its joins.
  """
  text = " " + _WHITESPACE.sub(" ", article).strip() + " "
  out, last = [], 0
  for k in range(1, len(summary)):
    if summary[k - 1] not in ".!?\"'" or summary[k].isspace():
      continue
    left, right = summary[max(0, k - _JOIN_WINDOW) : k], summary[k : k + _JOIN_WINDOW]
    if left + " " in text and " " + right in text and left + right not in text:
      out += [summary[last:k], " "]
      last = k
  return "".join(out) + summary[last:]


def _translate(root: str, split: str, direction: str) -> TaskSplit:
  if direction not in ("de-en", "en-de"):
    raise ValueError(f"direction={direction!r} must be 'de-en' or 'en-de'")
  stem = {"train": "train", "validation": "val", "test": "test_2016_flickr"}[split]
  src, tgt = direction.split("-")
  base = os.path.join(root, "multi30k", stem)
  return read_parallel(f"{base}.{src}", f"{base}.{tgt}")[0]


def _summarize(root: str, split: str) -> TaskSplit:
  path = os.path.join(root, "bbc_summary", "bbc_summary.jsonl")
  wanted = {"test": 0, "validation": 1}.get(split)
  inputs, targets = [], []
  for lineno, line in enumerate(_lines(_read(path, "BBC summary")), 1):
    try:
      record = json.loads(line)
      article, summary = record["article"], record["summary"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
      raise DataError(
        f"{path}:{lineno}: expected an object with 'article' and 'summary' "
        f"({type(e).__name__}: {e})"
      ) from None
    bucket = _bucket(article, 10)
    if bucket == wanted or (wanted is None and bucket > 1):
      inputs.append(clean_text(article)[0])
      targets.append(fix_summary_spacing(clean_text(summary)[0], article))
  return TaskSplit(inputs, targets, [[t] for t in targets])


def qa_input(question: str, context: str) -> str:
  """The text-to-text form of a SQuAD question: ``"question: <q> context: <paragraph>"``."""
  return f"question: {question} context: {context}"


def _qa(root: str, split: str) -> TaskSplit:
  path = os.path.join(root, "squad", "dev-v1.1.json")
  try:
    articles = json.loads(_read(path, "SQuAD"))["data"]
  except (json.JSONDecodeError, TypeError, KeyError) as e:
    raise DataError(f"{path}: not a SQuAD v1.1 file ({type(e).__name__}: {e})") from None
  ranked = sorted(articles, key=lambda a: hashlib.sha256(a["title"].encode("utf-8")).digest())
  n_test, n_val = QA_SPLIT_ARTICLES["test"], QA_SPLIT_ARTICLES["validation"]
  chosen = {
    "test": ranked[:n_test],
    "validation": ranked[n_test : n_test + n_val],
    "train": ranked[n_test + n_val :],
  }[split]
  titles = {a["title"] for a in chosen}
  inputs, refs = [], []
  for article in articles:  # file order within a split
    if article["title"] not in titles:
      continue
    for paragraph in article["paragraphs"]:
      context = clean_text(paragraph["context"])[0]
      for qa in paragraph["qas"]:
        inputs.append(qa_input(clean_text(qa["question"])[0], context))
        refs.append([clean_text(a["text"])[0] for a in qa["answers"]])
  return TaskSplit(inputs, [r[0] for r in refs], refs)


def load_task_data(
  task: str, split: str, root: str = DEFAULT_ROOT, *, direction: str = "de-en"
) -> TaskSplit:
  """One fixed split of a text-to-text task (see the module docstring for the splits).

  Args:
    task: ``"translate"`` (Multi30k), ``"summarize"`` (BBC News Summary) or ``"qa"`` (SQuAD).
    split: ``"train"``, ``"validation"`` or ``"test"``.
    root: the directory holding ``multi30k/``, ``bbc_summary/`` and ``squad/``.
    direction: for ``"translate"``: ``"de-en"`` (German source) or ``"en-de"``.

  Returns:
    A :class:`TaskSplit` of ``SPLIT_SIZES[task][split]`` examples.

  Raises:
    ValueError: an unknown task, split or direction.
    DataError: a missing or malformed data file.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {TASKS}")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  if task == "translate":
    return _translate(root, split, direction)
  return _summarize(root, split) if task == "summarize" else _qa(root, split)


# ---------------------------------------------------------------- tokenizers


def build_text2text_tokenizers(
  sources: Sequence[str],
  targets: Sequence[str],
  kind: str = "bpe",
  vocab_size: int = 8000,
  shared: bool = True,
) -> tuple[Tokenizer, Tokenizer]:
  """``(source_tokenizer, target_tokenizer)`` for a text-to-text run.

  Args:
    sources, targets: the training texts of each side.
    kind: ``"bpe"`` (byte-level BPE trained here) or ``"byte"`` (UTF-8 bytes).
    vocab_size: the BPE vocabulary size of each tokenizer.
    shared: one tokenizer trained on both sides (returned twice, as needed by
      shared embeddings), or one per side, each trained on its own texts.

  Both kinds have the same special ids (pad 0/256, bos 1/257, eos 2/258), so a
  decoder's BOS and EOS do not depend on the choice.
  """
  if kind not in TOKENIZERS:
    raise ValueError(f"kind={kind!r} must be one of {list(TOKENIZERS)}")
  if kind == "byte":
    return ByteTokenizer(), ByteTokenizer()
  if shared:
    tok = BpeTokenizer.train(list(sources) + list(targets), vocab_size)
    return tok, tok
  return BpeTokenizer.train(list(sources), vocab_size), BpeTokenizer.train(
    list(targets), vocab_size
  )


def save_text2text_tokenizers(directory: str, source: Tokenizer, target: Tokenizer) -> None:
  """Writes ``directory/tokenizer.json`` (source, or shared), and the target's in
  ``directory/target/tokenizer.json`` only when it differs."""
  source.save(directory)
  if target.to_json() != source.to_json():
    target.save(os.path.join(directory, TARGET_TOKENIZER_DIR))


def load_text2text_tokenizers(directory: str) -> tuple[Tokenizer, Tokenizer]:
  """``(source, target)`` as written by :func:`save_text2text_tokenizers`."""
  source = load_tokenizer(directory)
  target_dir = os.path.join(directory, TARGET_TOKENIZER_DIR)
  if os.path.isdir(target_dir):
    return source, load_tokenizer(target_dir)
  return source, source


# ---------------------------------------------------------------- rows and iterators


class Text2TextRows:
  """Tokenised pairs as fixed-length rows, indexed like a dict of arrays.

  ``rows[key]`` for ``key`` in :data:`FIELDS`: ``inputs``, ``segment_ids``:
  ``np.int32[N, S]``; ``decoder_inputs``, ``decoder_segment_ids``, ``targets``:
  ``np.int32[N, T]``. ``len(rows)`` is ``N``. Attributes: ``source_pad_id``,
  ``target_pad_id``, ``truncated_sources``, ``truncated_targets``.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    source_pad_id: int,
    target_pad_id: int,
    truncated_sources: int = 0,
    truncated_targets: int = 0,
  ):
    self._arrays = {k: np.asarray(arrays[k], np.int32) for k in FIELDS}
    n, s = self._arrays["inputs"].shape
    t = self._arrays["targets"].shape[1]
    expected = {
      "inputs": (n, s),
      "segment_ids": (n, s),
      "decoder_inputs": (n, t),
      "decoder_segment_ids": (n, t),
      "targets": (n, t),
    }
    if n < 1 or any(self._arrays[k].shape != shape for k, shape in expected.items()):
      shapes = {k: v.shape for k, v in self._arrays.items()}
      raise ValueError(f"inconsistent text-to-text arrays: {shapes}")
    self.source_pad_id = source_pad_id
    self.target_pad_id = target_pad_id
    self.truncated_sources = truncated_sources
    self.truncated_targets = truncated_targets

  def __getitem__(self, key: str) -> np.ndarray:
    return self._arrays[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._arrays)

  def __len__(self) -> int:
    return self._arrays["inputs"].shape[0]

  def keys(self):
    return self._arrays.keys()

  @property
  def source_len(self) -> int:
    return self._arrays["inputs"].shape[1]

  @property
  def target_len(self) -> int:
    return self._arrays["targets"].shape[1]

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks examples into a batch.

    Args:
      rows: ``int[b]`` example indices; one outside ``[0, N)`` gives a padding
        row: pad ids, segment ids 0, targets -1.

    Returns:
      ``{"inputs", "segment_ids"}``: ``int32[b, S]``; ``{"decoder_inputs",
      "decoder_segment_ids", "targets"}``: ``int32[b, T]``.
    """
    rows = np.asarray(rows, np.int64)
    valid = ((rows >= 0) & (rows < len(self)))[:, None]
    idx = np.where(valid[:, 0], rows, 0)
    fill = {
      "inputs": self.source_pad_id,
      "segment_ids": 0,
      "decoder_inputs": self.target_pad_id,
      "decoder_segment_ids": 0,
      "targets": -1,
    }
    return {k: np.where(valid, v[idx], fill[k]).astype(np.int32) for k, v in self._arrays.items()}


def _pad_rows(
  ids: list[list[int]], length: int, eos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """``(tokens + [EOS])[:length]`` padded: ``(int32[N, length] ids, int64[N] lengths, n_cut)``."""
  out = np.full((len(ids), length), pad_id, np.int32)
  lengths = np.empty(len(ids), np.int64)
  cut = 0
  for i, tokens in enumerate(ids):
    row = [*tokens, eos_id]
    cut += len(row) > length
    row = row[:length]
    out[i, : len(row)] = row
    lengths[i] = len(row)
  return out, lengths, cut


def encode_text2text(
  sources: Sequence[str],
  targets: Sequence[str],
  source_tokenizer: Tokenizer,
  target_tokenizer: Tokenizer,
  source_len: int,
  target_len: int,
) -> Text2TextRows:
  """Tokenises pairs into teacher-forcing rows.

  A source row is ``tokens + [EOS]`` cut to ``S = source_len``; the target row
  ``y = (tokens + [EOS])[:T]``. A row longer than its length loses its end, EOS
  included: a cut target then teaches the decoder to go on at the cut, not to
  stop at an arbitrary point. With ``L = len(y)``:

  * ``decoder_inputs = [BOS, y[0], ..., y[L-2], pad...]`` (``y`` shifted right),
  * ``targets = [y[0], ..., y[L-1], -1...]``,
  * ``segment_ids`` / ``decoder_segment_ids``: 1 on the real positions of
    ``inputs`` / of ``targets`` (the first ``L``), 0 on padding.

  Args:
    sources, targets: ``N`` texts each.
    source_tokenizer, target_tokenizer: may be the same object.
    source_len, target_len: ``S >= 1``, ``T >= 1``.

  Returns:
    A :class:`Text2TextRows`; ``truncated_sources``/``truncated_targets``
    count the rows that were cut.
  """
  if source_len < 1 or target_len < 1:
    raise ValueError(f"source_len={source_len} and target_len={target_len} must be >= 1")
  if len(sources) != len(targets):
    raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
  if not len(sources):
    raise DataError("no text-to-text examples to encode")
  src, src_lengths, src_cut = _pad_rows(
    source_tokenizer.encode_batch(list(sources)),
    source_len,
    source_tokenizer.eos_id,
    source_tokenizer.pad_id,
  )
  tgt_pad = target_tokenizer.pad_id
  tgt, tgt_lengths, tgt_cut = _pad_rows(
    target_tokenizer.encode_batch(list(targets)), target_len, target_tokenizer.eos_id, tgt_pad
  )
  src_real = np.arange(source_len) < src_lengths[:, None]  # (N, S)
  tgt_real = np.arange(target_len) < tgt_lengths[:, None]  # (N, T)
  shifted = np.concatenate(
    [np.full((len(tgt), 1), target_tokenizer.bos_id, np.int32), tgt[:, :-1]], axis=1
  )  # (N, T)
  arrays = {
    "inputs": src,
    "segment_ids": src_real,
    "decoder_inputs": np.where(tgt_real, shifted, tgt_pad),
    "decoder_segment_ids": tgt_real,
    "targets": np.where(tgt_real, tgt, -1),
  }
  return Text2TextRows(arrays, source_tokenizer.pad_id, tgt_pad, src_cut, tgt_cut)


def make_text2text_train_iterator(
  data: Text2TextRows,
  batch_size: int,
  seed: int = 0,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """An infinite iterator of training batches, shuffled differently in each epoch.

  Args:
    data: from :func:`encode_text2text`.
    batch_size: global examples per batch, divisible by ``process_count``.
    seed: shuffle seed in ``[0, 2**32)``.
    process_index, process_count: as in :func:`llm_mp.data.make_train_iterator`;
      each process gets its contiguous slice of every global batch.

  Returns:
    A grain ``DatasetIterator`` of batches as :meth:`Text2TextRows.gather`
    (``B_local`` rows), with ``get_state()``/``set_state()`` for exact resumption.
  """
  return shuffled_batches(
    data, batch_size, seed, process_index=process_index, process_count=process_count
  )


def make_text2text_eval_iterator(
  data: Text2TextRows,
  batch_size: int,
  max_batches: int | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """One ordered pass over ``data``; the last batch is filled with padding rows.

  Global batch ``b`` holds examples ``b * batch_size ...`` in order, so
  generated outputs line up with the references; padding rows have
  ``targets == -1`` and segment ids 0 everywhere. ``max_batches`` stops early
  (None = all ``ceil(N / batch_size)`` batches). Other arguments as for
  :func:`make_text2text_train_iterator`.
  """
  return ordered_batches(
    data, batch_size, max_batches, process_index=process_index, process_count=process_count
  )


# ---------------------------------------------------------------- a run's text-to-text data


@dataclasses.dataclass(frozen=True)
class PreparedText2Text:
  """A run's text-to-text training and validation rows (``train.task="seq2seq"``).

  Attributes:
    tokenizer: the run's tokenizer, shared by source and target (saved as
      ``<workdir>/tokenizer.json``).
    train, val: the rows; ``val_split`` the validation examples (for metrics).
    source: where the examples came from, for the log.
    skipped: bad rows skipped (``data.bad_rows="skip"``).
    sha256: hex SHA-256 of every pair (both splits).
  """

  tokenizer: Tokenizer
  train: Text2TextRows
  val: Text2TextRows
  val_split: TaskSplit
  source: str
  skipped: int
  sha256: str = ""

  def __str__(self) -> str:
    return (
      f"text-to-text data: {self.source}; train {len(self.train):,} / val "
      f"{len(self.val):,} pairs, {self.skipped} bad row(s) skipped, "
      f"vocab {self.tokenizer.vocab_size}"
    )


def read_pairs(paths: Sequence[str], bad_rows: str = "error") -> tuple[TaskSplit, int]:
  """Pairs from ``paths``: ``.jsonl`` files (``input``/``target`` fields), or
  exactly two aligned text files (source, target).

  Raises:
    DataError: any other combination, or what the readers raise.
  """
  paths = tuple(paths)
  if paths and all(p.endswith(".jsonl") for p in paths):
    return read_text2text_jsonl(paths, bad_rows=bad_rows)
  if len(paths) == 2 and not any(p.endswith(".jsonl") for p in paths):
    return read_parallel(paths[0], paths[1], bad_rows=bad_rows)
  raise DataError(
    f"text-to-text data {list(paths)}: give .jsonl files with input/target "
    "fields, or two aligned text files (source, target)"
  )


def prepare_text2text(
  cfg: Any, workdir: str, tokenizer: Tokenizer | None = None, write: bool = True
) -> PreparedText2Text:
  """Reads, tokenises and splits the text-to-text data of ``cfg`` (a DataConfig).

  ``cfg.paths``: the training pairs (:func:`read_pairs`); ``cfg.val_paths``
  the validation pairs, else every ``1/val_fraction``-th pair is held out.
  The tokenizer is ``tokenizer``, else the workdir's (resuming), else one of
  ``cfg.tokenizer`` trained on both sides of the training pairs. Rows are
  ``cfg.seq_len`` source and ``cfg.target_len`` (default: ``seq_len``) target tokens.

  Raises:
    DataError: no data, unreadable data, or an empty validation split.
  """
  if not cfg.paths:
    raise DataError(
      "train.task='seq2seq' needs data: --data train.jsonl (input/target fields) "
      "or two aligned files, and data.val_paths likewise"
    )
  split, skipped = read_pairs(cfg.paths, cfg.bad_rows)
  if cfg.val_paths:
    val, val_skipped = read_pairs(cfg.val_paths, cfg.bad_rows)
    skipped += val_skipped
  else:
    step = max(int(round(1 / cfg.val_fraction)), 2) if cfg.val_fraction > 0 else 0
    held = [step and i % step == step - 1 for i in range(len(split.inputs))]
    pick = lambda xs, keep: [x for x, h in zip(xs, held) if h == keep]
    val = TaskSplit(
      pick(split.inputs, True), pick(split.targets, True), pick(split.references, True)
    )
    split = TaskSplit(
      pick(split.inputs, False), pick(split.targets, False), pick(split.references, False)
    )
  if not val.inputs:
    raise DataError(
      f"no validation pairs: set data.val_paths or data.val_fraction > 0 "
      f"(data.val_fraction={cfg.val_fraction})"
    )
  if tokenizer is None:
    if os.path.isfile(os.path.join(workdir, TOKENIZER_FILE)):
      tokenizer = load_tokenizer(workdir)
    else:
      tokenizer, _ = build_text2text_tokenizers(
        split.inputs, split.targets, kind=cfg.tokenizer, vocab_size=cfg.bpe_vocab_size, shared=True
      )
  if write:
    tokenizer.save(workdir)
  encode = lambda s: encode_text2text(
    s.inputs, s.targets, tokenizer, tokenizer, cfg.seq_len, cfg.target_len or cfg.seq_len
  )
  h = hashlib.sha256()
  for s in (split, val):
    for x, y in zip(s.inputs, s.targets):
      h.update(f"{x}\t{y}\n".encode())
    h.update(b"\0")
  source = ", ".join(cfg.paths)
  return PreparedText2Text(
    tokenizer, encode(split), encode(val), val, source, skipped, h.hexdigest()
  )
