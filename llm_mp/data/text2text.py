"""Text-to-text data: parallel and JSON-lines readers, tokenizers, teacher-forcing rows.

Typical use by an encoder-decoder run (batches from :mod:`llm_mp.data.examples`)::

  train, skipped = read_text2text_jsonl("train.jsonl", "article", "summary")
  src_tok, tgt_tok = build_text2text_tokenizers(train.inputs, train.targets, "bpe", 8000)
  rows = encode_text2text(train.inputs, train.targets, src_tok, tgt_tok, 64, 64)
  it = shuffled_batches(rows, batch_size=32, seed=0)
  batch = next(it)  # {"inputs", "segment_ids"}: int32[B, S];
                    # {"decoder_inputs", "decoder_segment_ids", "targets"}: int32[B, T]

Readers (each text is cleaned as everywhere in llm_mp: NFC, no control
characters, outer whitespace stripped):

* :func:`read_parallel`: two aligned plain-text files, one example per line
  (``\\n`` ends a line; a ``\\r`` before it is dropped; other Unicode line
  separators are text, so they cannot misalign the files). Files with
  different line counts are a :class:`DataError` naming both files and counts.
* :func:`read_text2text_jsonl`: one JSON object per line with an input field
  and a target field (names configurable: ``data.source_field`` and
  ``data.target_field`` in a run); the target is a string, or a non-empty list
  of strings (several references; the first is the training target). Blank
  lines are skipped.

A bad row (an empty line on either side, invalid JSON, a missing, empty or
non-string field) raises ``DataError("<file>:<line>: <problem>")``, or with
``bad_rows="skip"`` is dropped and counted, as in :mod:`llm_mp.data.labelled`.
Fixed splits of public sets (Multi30k, BBC News Summary, SQuAD) are made by
``experiments/datasets.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from llm_mp.config import TOKENIZERS
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
  split_lines,
)
from llm_mp.data.files import DataError
from llm_mp.data.tokenizer import BpeTokenizer, ByteTokenizer, Tokenizer, load_tokenizer

FIELDS = ("inputs", "segment_ids", "decoder_inputs", "decoder_segment_ids", "targets")
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


# ---------------------------------------------------------------- readers


def _parallel_rows(
  source_path: str, target_path: str
) -> Iterator[tuple[str, int, tuple[str, str] | BadRow]]:
  """``(path, line, (source, target) or problem)`` for each line pair of two aligned files."""
  src = split_lines(read_text(source_path, "parallel source"))
  tgt = split_lines(read_text(target_path, "parallel target"))
  if len(src) != len(tgt):
    raise DataError(
      f"misaligned parallel files: {source_path} has {len(src)} lines but "
      f"{target_path} has {len(tgt)}"
    )
  for lineno, (s, t) in enumerate(zip(src, tgt), 1):
    s, t = clean_text(s)[0], clean_text(t)[0]
    if not s or not t:
      yield source_path if not s else target_path, lineno, BadRow("empty line")
    else:
      yield source_path, lineno, (s, t)


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
  pairs, skipped = collect_examples(
    _parallel_rows(source_path, target_path),
    bad_rows,
    f"{source_path} / {target_path}",
    unit="pair",
  )
  targets = [t for _, t in pairs]
  return TaskSplit([s for s, _ in pairs], targets, [[t] for t in targets]), skipped


def _field_text(record: dict, field: str) -> str:
  value = record.get(field)
  if value is None:
    raise BadRow(f"missing field {field!r}")
  if not isinstance(value, str):
    raise BadRow(f"field {field!r} is not a string: {value!r}")
  cleaned = clean_text(value)[0]
  if not cleaned:
    raise BadRow(f"field {field!r} is empty")
  return cleaned


def _references(record: dict, field: str) -> list[str]:
  value = record.get(field)
  if isinstance(value, list):
    if not value:
      raise BadRow(f"field {field!r} is an empty list")
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
  paths = (paths,) if isinstance(paths, str) else tuple(paths)
  parse = lambda record: (_field_text(record, input_field), _references(record, target_field))
  rows = (
    (path, line, example)
    for path in paths
    for line, example in jsonl_examples(read_text(path, "text-to-text"), parse)
  )
  examples, skipped = collect_examples(rows, bad_rows, ", ".join(paths) or "no files")
  refs = [r for _, r in examples]
  return TaskSplit([x for x, _ in examples], [r[0] for r in refs], refs), skipped


# ---------------------------------------------------------------- denoising


def span_noise_mask(
  n: int, mask_fraction: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
  """bool ``[n]``: ``round(mask_fraction * n)`` masked positions (at least 1, at most
  ``n - 1``) in ``round(masked / mean_span)`` separate spans of random positive
  lengths, the kept runs between them positive too and those at either end possibly
  empty (T5's ``random_spans_noise_mask``, without its last span always at the end);
  drawn from ``rng``."""
  if n < 2:
    raise ValueError(f"n={n}: a span mask needs at least 2 positions")
  masked = min(max(round(mask_fraction * n), 1), n - 1)
  spans = min(max(round(masked / mean_span), 1), masked, n - masked)

  def lengths(total: int, parts: int) -> np.ndarray:  # `parts` positive ints summing to `total`
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))

  noise = lengths(masked, spans)
  kept = lengths(n - masked + 2, spans + 1) - np.eye(spans + 1, dtype=int)[[0, -1]].sum(0)
  runs = np.append(np.stack([kept[:-1], noise], 1).reshape(-1), kept[-1])  # kept, masked, ..., kept
  return np.repeat(np.arange(len(runs)) % 2 == 1, runs)


def denoising_pairs(
  texts: Sequence[str],
  chunk_words: int,
  mask_fraction: float = 0.15,
  mean_span: float = 3.0,
  seed: int = 0,
  mask: str = "<mask>",
) -> TaskSplit:
  """Text infilling pairs for pre-training an encoder-decoder to copy its source
  (BART's objective on words): each text is cut into chunks of ``chunk_words``
  whitespace-separated words (a last chunk of one word is dropped); the input is
  the chunk with :func:`span_noise_mask`'s spans each replaced by one ``mask``,
  the target the clean chunk (its words joined by single spaces).

  Args:
    texts: documents (e.g. the training articles; never the test split's).
    chunk_words: words per chunk (>= 2).
    mask_fraction: the fraction of each chunk's words masked (in (0, 1)).
    mean_span: the mean length of a masked span, in words.
    seed: the corruption is a function of ``(texts, seed)`` and the settings.
    mask: the text that stands for a masked span.

  Returns:
    A :class:`TaskSplit`: corrupted chunks -> clean chunks (one reference each).
  """
  if chunk_words < 2 or not 0 < mask_fraction < 1 or mean_span < 1:
    raise ValueError(
      f"chunk_words={chunk_words} must be >= 2, mask_fraction={mask_fraction} in (0, 1), "
      f"mean_span={mean_span} >= 1"
    )
  rng = np.random.default_rng(seed)
  inputs, targets = [], []
  for text in texts:
    words = text.split()
    for start in range(0, len(words), chunk_words):
      chunk = words[start : start + chunk_words]
      if len(chunk) < 2:
        continue
      noise = span_noise_mask(len(chunk), mask_fraction, mean_span, rng)
      starts = noise & ~np.concatenate([[False], noise[:-1]])  # first word of each span
      inputs.append(
        " ".join(mask if s else w for w, m, s in zip(chunk, noise, starts) if s or not m)
      )
      targets.append(" ".join(chunk))
  return TaskSplit(inputs, targets, [[t] for t in targets])


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


# ---------------------------------------------------------------- rows


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
) -> ExampleRows:
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
    An :class:`ExampleRows` of :data:`FIELDS`; ``truncated["inputs"]`` /
    ``truncated["targets"]`` count the rows that were cut. A padding row
    (:meth:`ExampleRows.gather` of index -1) has pad ids, segment ids 0 and
    targets -1.
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
  fill = {
    "inputs": source_tokenizer.pad_id,
    "segment_ids": 0,
    "decoder_inputs": tgt_pad,
    "decoder_segment_ids": 0,
    "targets": -1,
  }
  return ExampleRows(arrays, fill, {"inputs": src_cut, "targets": tgt_cut})


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
  train: ExampleRows
  val: ExampleRows
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


def read_pairs(
  paths: Sequence[str],
  bad_rows: str = "error",
  source_field: str = "input",
  target_field: str = "target",
) -> tuple[TaskSplit, int]:
  """Pairs from ``paths``: ``.jsonl`` files (fields ``source_field``/``target_field``), or
  exactly two aligned text files (source, target).

  Raises:
    DataError: any other combination, or what the readers raise.
  """
  paths = tuple(paths)
  if paths and all(p.endswith(".jsonl") for p in paths):
    return read_text2text_jsonl(paths, source_field, target_field, bad_rows)
  if len(paths) == 2 and not any(p.endswith(".jsonl") for p in paths):
    return read_parallel(paths[0], paths[1], bad_rows=bad_rows)
  raise DataError(
    f"text-to-text data {list(paths)}: give .jsonl files with {source_field}/{target_field} "
    "fields (data.source_field/target_field), or two aligned text files (source, target)"
  )


def prepare_text2text(
  cfg: Any, workdir: str, tokenizer: Tokenizer | None = None, write: bool = True
) -> PreparedText2Text:
  """Reads, tokenises and splits the text-to-text data of ``cfg`` (a DataConfig).

  ``cfg.paths``: the training pairs (:func:`read_pairs`, JSON-lines fields
  ``cfg.source_field``/``cfg.target_field``); ``cfg.val_paths`` the validation
  pairs, else every ``1/val_fraction``-th pair is held out. The tokenizer is
  ``tokenizer``, else the workdir's (resuming; it must be of kind
  ``cfg.tokenizer``), else one of ``cfg.tokenizer`` trained on both sides of
  the training pairs; it is saved to the workdir unless ``write`` is False.
  Rows are ``cfg.seq_len`` source and ``cfg.target_len`` (default:
  ``seq_len``) target tokens.

  Raises:
    DataError: no data, unreadable data, an empty validation split, or a
      workdir tokenizer of another kind.
  """
  if not cfg.paths:
    raise DataError(
      "train.task='seq2seq' needs data: --data train.jsonl (fields named by "
      "data.source_field/target_field) or two aligned files, and data.val_paths likewise"
    )
  fields = (cfg.bad_rows, cfg.source_field, cfg.target_field)
  split, skipped = read_pairs(cfg.paths, *fields)
  if cfg.val_paths:
    val, val_skipped = read_pairs(cfg.val_paths, *fields)
    skipped += val_skipped
  else:
    kept, held = hold_out(cfg.val_fraction, *split, what="pairs")
    split, val = TaskSplit(*kept), TaskSplit(*held)
  tokenizer = run_tokenizer(cfg, workdir, split.inputs + split.targets, tokenizer, write=write)
  encode = lambda s: encode_text2text(
    s.inputs, s.targets, tokenizer, tokenizer, cfg.seq_len, cfg.target_len or cfg.seq_len
  )
  sha = examples_sha256(zip(split.inputs, split.targets), zip(val.inputs, val.targets))
  source = ", ".join(cfg.paths)
  return PreparedText2Text(tokenizer, encode(split), encode(val), val, source, skipped, sha)
