"""Labelled text for classification: the reader, fixed-length rows, a built-in set.

Typical use by a fine-tuning loop (batches from :mod:`llm_mp.data.examples`)::

  texts, labels, names, skipped = read_labelled(cfg.data.paths, cfg.data.text_field,
                                                cfg.data.label_field, cfg.data.bad_rows)
  dev_texts, dev_labels, _, _ = read_labelled(dev_paths, ..., labels=names)
  train, n_truncated = encode_labelled(texts, labels, tokenizer, cfg.data.seq_len)
  train_it = shuffled_batches(train, batch_size, seed)
  batch = next(train_it)  # {"inputs", "segment_ids", "positions"}: int32[B, T]; "labels": int32[B]

File formats (chosen by suffix; each file is UTF-8, a leading byte-order mark is dropped):

* ``.tsv``: a header row, then one row per example, fields separated by tabs
  and never quoted (``csv.QUOTE_NONE``), as GLUE ships SST-2: a ``"`` is text.
* ``.csv``: a header row, then rows in the ``csv`` module's default dialect
  (fields may be quoted, ``""`` is a quote, a quoted field may span lines).
* ``.jsonl``: one JSON object per line (lines end at ``\\n``); blank lines are
  skipped. A label may be a string or an integer.

Labels are names (strings). Without an explicit ``labels`` list, the classes
are the sorted distinct labels read, numerically sorted when all are integers
(so ``"0"``, ``"1"``, ``"10"``, ``"2"`` become classes 0, 1, 3, 2).

A bad row (text missing or empty after cleaning, label missing or empty, a
label not in ``labels``, a label that would make more than ``n_classes``
classes, a wrong number of fields, a line that is not a JSON object) raises a
:class:`DataError` ``"<file>:<line>: <problem>"``, or with ``bad_rows="skip"``
is dropped and counted. A header without the text or the label column is
always an error: skipping would silently drop the whole file.

:func:`builtin_labelled` is a small generated sentiment set that needs no
download, for tests and as the default when no labelled files are given.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from llm_mp.config import DataConfig
from llm_mp.data.corpus import clean_text
from llm_mp.data.examples import (
  BadRow,
  ExampleRows,
  collect_examples,
  examples_sha256,
  hold_out,
  jsonl_examples,
  read_text,
  run_tokenizer,
)
from llm_mp.data.files import DataError
from llm_mp.data.tokenizer import Tokenizer

SUFFIXES = (".tsv", ".csv", ".jsonl")
FIELDS = ("inputs", "segment_ids", "positions", "labels")
_INTEGER = re.compile(r"[+-]?\d+")


# ---------------------------------------------------------------- reading


def _label_text(value: object) -> str:
  """A label value from a file as its name; integers (JSON) become their decimal text."""
  if isinstance(value, str):
    label = value.strip()
  elif isinstance(value, int) and not isinstance(value, bool):
    label = str(value)
  elif value is None:
    label = ""
  else:
    raise BadRow(f"label {value!r} is not a string or an integer")
  if not label:
    raise BadRow("missing label")
  return label


def _example(text: object, label: object, text_field: str) -> tuple[str, str]:
  """A cleaned ``(text, label name)`` from raw field values."""
  if text is not None and not isinstance(text, str):
    raise BadRow(f"field {text_field!r} is not a string: {text!r}")
  cleaned, _ = clean_text(text or "")
  if not cleaned:
    raise BadRow(f"missing text (field {text_field!r} is absent or empty)")
  return cleaned, _label_text(label)


def _table_rows(
  path: str, text: str, text_field: str, label_field: str
) -> Iterator[tuple[int, tuple[str, str] | BadRow]]:
  """``(line, example or problem)`` for each row of a .tsv/.csv file with a header."""
  if path.endswith(".tsv"):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader, None)
  except csv.Error as e:
    raise DataError(f"{path}:1: unreadable header ({e})") from None
  header = [h.strip() for h in header or []]
  missing = [f for f in (text_field, label_field) if f not in header]
  if missing:
    raise DataError(
      f"{path}:1: header {header} lacks column(s) {missing} (data.text_field="
      f"{text_field!r}, data.label_field={label_field!r})"
    )
  i_text, i_label = header.index(text_field), header.index(label_field)
  line = reader.line_num  # the line a row starts on: a quoted field may span lines
  while True:
    start = line + 1
    try:
      row = next(reader, None)
    except csv.Error as e:
      yield start, BadRow(f"unreadable row ({e})")
      return  # the reader cannot resynchronise after a csv error
    line = reader.line_num
    if row is None:
      return
    if not row:
      continue  # a blank line
    if len(row) != len(header):
      yield start, BadRow(f"expected {len(header)} fields as in the header, found {len(row)}")
      continue
    try:
      yield start, _example(row[i_text], row[i_label], text_field)
    except BadRow as e:
      yield start, e


def _sorted_labels(names: set[str]) -> tuple[str, ...]:
  """Distinct labels in class order: numeric when all are integers, else lexicographic."""
  if all(_INTEGER.fullmatch(n) for n in names):
    return tuple(sorted(names, key=lambda n: (int(n), n)))
  return tuple(sorted(names))


def _file_rows(
  paths: tuple[str, ...],
  text_field: str,
  label_field: str,
  labels: Sequence[str] | None,
  n_classes: int | None,
) -> Iterator[tuple[str, int, tuple[str, str] | BadRow]]:
  """``(path, line, example or problem)`` for every row of ``paths``, labels checked."""
  known = None if labels is None else {name: i for i, name in enumerate(labels)}
  seen: dict[str, None] = {}  # the labels of good rows, in order of appearance
  for path in paths:
    if os.path.isfile(path) and not path.endswith(SUFFIXES):
      raise DataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    text = read_text(path, "labelled data")  # raises when the file is missing
    rows = (
      jsonl_examples(text, lambda r: _example(r.get(text_field), r.get(label_field), text_field))
      if path.endswith(".jsonl")
      else _table_rows(path, text, text_field, label_field)
    )
    for line, example in rows:
      if not isinstance(example, BadRow):
        label = example[1]
        if known is not None and label not in known:
          example = BadRow(f"label {label!r} is not one of {tuple(known)}")
        elif known is None and n_classes is not None and label not in seen:
          if len(seen) == n_classes:
            example = BadRow(
              f"label {label!r} makes {n_classes + 1} classes, more than "
              f"model.n_classes={n_classes} (the others: {tuple(seen)})"
            )
          else:
            seen[label] = None
      yield path, line, example


def read_labelled(
  paths: str | Sequence[str],
  text_field: str,
  label_field: str,
  bad_rows: str = "error",
  labels: Sequence[str] | None = None,
  *,
  n_classes: int | None = None,
) -> tuple[list[str], np.ndarray, tuple[str, ...], int]:
  """Reads labelled examples from ``.tsv``/``.csv``/``.jsonl`` files, in the given order.

  Args:
    paths: one file or several (not directories).
    text_field: the column or key holding the text (``"sentence"`` for SST-2).
    label_field: the column or key holding the label.
    bad_rows: ``"error"`` raises on the first bad row; ``"skip"`` drops and counts them.
    labels: the class names in class order (e.g. the training set's names when
      reading a dev set); a label outside them is a bad row. None: the sorted
      distinct labels of these files (see the module docstring).
    n_classes: without ``labels``, the most classes the files may hold
      (``model.n_classes``): a row whose label would be one more class is a
      bad row (``"<file>:<line>: label '2' makes 3 classes, ..."``). None: any number.

  Returns:
    ``(texts, label_ids, label_names, skipped)``: cleaned texts (NFC, no control
    characters, stripped), ``np.int32[N]`` class ids indexing ``label_names``,
    and the number of bad rows skipped.

  Raises:
    DataError: a missing or unsupported file, non-UTF-8 bytes (with the byte
      offset), a header without the columns, a bad row when ``bad_rows="error"``
      (``"<file>:<line>: <problem>"``), or no examples at all.
  """
  paths = (paths,) if isinstance(paths, str) else tuple(paths)
  examples, skipped = collect_examples(
    _file_rows(paths, text_field, label_field, labels, n_classes),
    bad_rows,
    ", ".join(paths) or "no files",
    what="labelled examples",
  )
  names = [label for _, label in examples]
  label_names = tuple(labels) if labels is not None else _sorted_labels(set(names))
  index = {name: i for i, name in enumerate(label_names)}
  texts = [text for text, _ in examples]
  return texts, np.array([index[n] for n in names], np.int32), label_names, skipped


# ---------------------------------------------------------------- rows


def encode_labelled(
  texts: Sequence[str], label_ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer, seq_len: int
) -> tuple[ExampleRows, int]:
  """Tokenises examples into rows ``BOS tokens EOS pad...`` of ``seq_len`` tokens.

  Texts longer than ``seq_len - 2`` tokens are cut at the end so that BOS and
  EOS always fit.

  Args:
    texts: ``N`` texts.
    label_ids: ``int[N]`` class ids.
    tokenizer: provides ``encode_batch``, ``bos_id``, ``eos_id``, ``pad_id``.
    seq_len: ``T >= 2``.

  Returns:
    ``(rows, n_truncated)``: an :class:`ExampleRows` whose ``inputs`` are
    ``int32[N, T]`` ids, ``segment_ids`` 1 on BOS..EOS and 0 on padding,
    ``positions`` 0..len-1 on real tokens and 0 on padding, ``labels`` ``int32[N]``;
    and how many texts were truncated (also ``rows.truncated["inputs"]``).
    A padding row (:meth:`ExampleRows.gather` of index -1) has pad ids,
    segment and position 0, label -1.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2 (BOS and EOS)")
  labels = np.asarray(label_ids, np.int32)
  if labels.shape != (len(texts),):
    raise ValueError(f"{len(texts)} texts but label_ids has shape {labels.shape}")
  if not len(texts):
    raise DataError("no labelled examples to encode")
  ids = tokenizer.encode_batch(list(texts))
  n = len(ids)
  inputs = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  lengths = np.empty(n, np.int64)
  truncated = 0
  for i, tokens in enumerate(ids):
    truncated += len(tokens) > seq_len - 2
    row = [tokenizer.bos_id, *tokens[: seq_len - 2], tokenizer.eos_id]
    inputs[i, : len(row)] = row
    lengths[i] = len(row)
  real = np.arange(seq_len) < lengths[:, None]  # (N, T)
  arrays = {
    "inputs": inputs,
    "segment_ids": real.astype(np.int32),
    "positions": np.where(real, np.arange(seq_len), 0),
    "labels": labels,
  }
  fill = {"inputs": tokenizer.pad_id, "segment_ids": 0, "positions": 0, "labels": -1}
  return ExampleRows(arrays, fill, {"inputs": truncated}), truncated


# ---------------------------------------------------------------- the built-in set

# A generated two-class sentiment set: "<subject> <verb> [<intensifier>] <adjective>[<tail>]",
# labelled by the adjective's polarity. Only the adjective carries the label, so a model must
# find it among varying neighbours and positions; dev sentences never occur in train.
_SUBJECTS = tuple(
  "the film|this movie|the story|the acting|the script|the music|the ending|the cast|the plot|"
  "the dialogue|the director's work|the final scene".split("|")
)
_VERBS = ("is", "was", "feels", "seemed", "turned out")
_INTENSIFIERS = ("", "very ", "really ", "quite ", "truly ")
_ADJECTIVES = {
  "negative": tuple("bad awful boring dull weak tedious clumsy ugly lifeless annoying".split()),
  "positive": tuple(
    "good great wonderful charming funny brilliant moving clever beautiful delightful".split()
  ),
}
_TAILS = (
  "",
  " overall",
  " from start to finish",
  " in the end",
  " for most of its length",
  " , as expected",
)
BUILTIN_LABELS = ("negative", "positive")
BUILTIN_SIZES = {"train": 2000, "dev": 500}  # balanced: half of each split per class


def _digest(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8")).digest()


def builtin_labelled(split: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """A small built-in sentiment set: generated, deterministic, no download.

  Sentences such as ``"the plot was really tedious in the end"`` (negative) or
  ``"this movie seemed charming"`` (positive): 12 subjects x 5 verbs x 5
  intensifiers x 10 adjectives x 6 tails give 18,000 sentences per class. Each
  class's sentences are ordered by their SHA-256 (independent of Python,
  NumPy and platform); the first 1,000 of each class are ``"train"``, the next
  250 ``"dev"``, so the splits are disjoint and balanced, and the examples of a
  split are ordered by hash too (classes mixed). Every adjective appears in
  both splits: the task is to learn which words carry which polarity and to
  find them in the sentence, which a bag-of-words model and a tiny encoder can.

  Args:
    split: ``"train"`` (2,000 examples) or ``"dev"`` (500).

  Returns:
    ``(texts, labels, label_names)`` with ``labels`` ``np.int32[N]`` indexing
    ``label_names == ("negative", "positive")``.
  """
  if split not in BUILTIN_SIZES:
    raise ValueError(f"split={split!r} must be one of {tuple(BUILTIN_SIZES)}")
  texts, labels = _builtin_examples()[split]
  return list(texts), np.array(labels, np.int32), BUILTIN_LABELS


@functools.lru_cache(maxsize=1)
def _builtin_examples() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """``{split: (texts, labels)}``, built once per process (about 0.1 s)."""
  per_class = {s: n // len(BUILTIN_LABELS) for s, n in BUILTIN_SIZES.items()}
  pairs = {"train": [], "dev": []}
  for label, name in enumerate(BUILTIN_LABELS):
    texts = sorted(
      (
        f"{subj} {verb} {inten}{adj}{tail}"
        for subj, verb, inten, adj, tail in itertools.product(
          _SUBJECTS, _VERBS, _INTENSIFIERS, _ADJECTIVES[name], _TAILS
        )
      ),
      key=_digest,
    )
    n_train = per_class["train"]
    pairs["train"] += [(t, label) for t in texts[:n_train]]
    pairs["dev"] += [(t, label) for t in texts[n_train : n_train + per_class["dev"]]]
  out = {}
  for split, examples in pairs.items():
    examples.sort(key=lambda p: _digest(p[0]))
    out[split] = (tuple(t for t, _ in examples), tuple(y for _, y in examples))
  return out


# ---------------------------------------------------------------- a run's labelled data


@dataclasses.dataclass(frozen=True)
class PreparedLabelled:
  """A run's labelled training and validation rows.

  Attributes:
    tokenizer: the run's tokenizer (saved as ``<workdir>/tokenizer.json``).
    train, val: the rows.
    label_names: class names in class order (from the training files).
    source: where the examples came from, for the log.
    skipped: bad rows skipped (``data.bad_rows="skip"``).
    sha256: hex SHA-256 of every example (texts and labels, both splits): a
      resumed run checks its data did not change.
  """

  tokenizer: Tokenizer
  train: ExampleRows
  val: ExampleRows
  label_names: tuple[str, ...]
  source: str
  skipped: int
  sha256: str = ""

  def __str__(self) -> str:
    return (
      f"labelled data: {self.source}; train {len(self.train):,} / val {len(self.val):,} "
      f"examples, classes {list(self.label_names)}, {self.skipped} bad row(s) skipped, "
      f"truncated to {self.train['inputs'].shape[1]} tokens: "
      f"{self.train.truncated['inputs'] + self.val.truncated['inputs']}"
    )


def prepare_labelled(
  cfg: DataConfig,
  workdir: str,
  tokenizer: Tokenizer | None = None,
  write: bool = True,
  *,
  n_classes: int | None = None,
) -> PreparedLabelled:
  """Reads, tokenises and splits the labelled data of ``cfg`` for a run in ``workdir``.

  ``cfg.paths`` are the training files (none: :func:`builtin_labelled`);
  ``cfg.val_paths`` the validation files, else every ``1/val_fraction``-th
  training example is held out. The tokenizer is ``tokenizer`` (e.g. the
  source run's, when fine-tuning), else the workdir's (resuming), else a new
  one of ``cfg.tokenizer`` built on the training texts; it is saved to the
  workdir unless ``write`` is False (evaluation never writes into a run).
  ``n_classes`` (``model.n_classes``) bounds the classes of the training
  files, as in :func:`read_labelled`.

  Raises:
    DataError: as :func:`read_labelled`, or an empty validation split.
  """
  if cfg.paths:
    texts, labels, names, skipped = read_labelled(
      cfg.paths, cfg.text_field, cfg.label_field, cfg.bad_rows, n_classes=n_classes
    )
    source = ", ".join(cfg.paths)
  else:
    texts, labels, names = builtin_labelled("train")
    skipped, source = 0, "the built-in sentiment set"
  if cfg.val_paths:
    val_texts, val_labels, _, val_skipped = read_labelled(
      cfg.val_paths, cfg.text_field, cfg.label_field, cfg.bad_rows, labels=names
    )
    skipped += val_skipped
  elif not cfg.paths:
    val_texts, val_labels, _ = builtin_labelled("dev")
  else:
    (texts, labels), (val_texts, val_labels) = hold_out(cfg.val_fraction, texts, labels)
  tokenizer = run_tokenizer(cfg, workdir, texts, tokenizer, write=write)
  train, _ = encode_labelled(texts, labels, tokenizer, cfg.seq_len)
  val, _ = encode_labelled(val_texts, val_labels, tokenizer, cfg.seq_len)
  sha = examples_sha256(
    ((int(y), x) for x, y in zip(texts, labels)),
    ((int(y), x) for x, y in zip(val_texts, val_labels)),
  )
  return PreparedLabelled(tokenizer, train, val, names, source, skipped, sha)
