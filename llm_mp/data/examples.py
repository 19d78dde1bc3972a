"""What the example readers share: rows, bad rows, the hold-out, hashes, tokenizer, batches.

A reader (:mod:`llm_mp.data.labelled`, :mod:`llm_mp.data.text2text`) turns its
files into examples and its examples into :class:`ExampleRows`; this module
does the rest the same way for every reader::

  rows = ((path, line, example_or_BadRow) for ...)    # the reader parses its files
  examples, skipped = collect_examples(rows, cfg.bad_rows, source)
  (xs, ys), (val_xs, val_ys) = hold_out(cfg.val_fraction, xs, ys)
  tokenizer = run_tokenizer(cfg, workdir, xs)         # given, the run's, or a new one
  train = ExampleRows(arrays, fill)                   # the reader tokenises its examples
  it = shuffled_batches(train, batch_size, seed)      # {key: int32[B_local, ...]}
  for batch in ordered_batches(val, batch_size): ...  # one padded pass

The batch iterators serve any row source with ``len(rows)`` and
``rows.gather(indices)``: :class:`ExampleRows` and the packed language-model
rows of :mod:`llm_mp.data.pipeline` alike. ``batch_size`` is global: every
process gets its own contiguous, disjoint slice of each global batch, in
process order. Both iterators are deterministic and resumable:
``it.get_state()`` is a small JSON-able dict and ``it.set_state(state)`` on a
fresh iterator made with the same arguments continues exactly where the saved
one stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grain
import jax
import numpy as np

from llm_mp.config import DataConfig
from llm_mp.data.corpus import _decode
from llm_mp.data.files import DataError
from llm_mp.data.tokenizer import (
  TOKENIZER_FILE,
  ByteTokenizer,
  Tokenizer,
  build_tokenizer,
  load_tokenizer,
)

_T = TypeVar("_T")

# One background thread assembling a few batches ahead: rows are cheap numpy
# gathers, and more threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


# ---------------------------------------------------------------- files and bad rows


def read_text(path: str, what: str) -> str:
  """The UTF-8 text of ``path`` (a leading byte-order mark dropped).

  Raises:
    DataError: ``"<what> file not found: <path>"``, or non-UTF-8 bytes (with the offset).
  """
  if not os.path.isfile(path):
    raise DataError(f"{what} file not found: {path}")
  return _decode(path)


def split_lines(text: str) -> list[str]:
  """Lines split at ``\\n`` only, a ``\\r`` before it dropped; a final newline opens no new
  line. Other Unicode line separators (U+2028, ...) stay text, so they cannot shift lines."""
  if not text:
    return []
  return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]


class BadRow(Exception):
  """A problem with one row; :func:`collect_examples` turns it into a DataError or a skip."""


def jsonl_examples(text: str, parse: Callable[[dict], _T]) -> Iterator[tuple[int, _T | BadRow]]:
  """``(line, parse(object) or problem)`` for each non-blank line of a JSON-lines text.

  A line that is not JSON or not an object, or whose ``parse`` raises
  :class:`BadRow`, gives the problem.
  """
  for lineno, line in enumerate(split_lines(text), 1):
    if not line.strip():
      continue
    try:
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, found {type(record).__name__}")
      example = parse(record)
    except BadRow as e:
      yield lineno, e
      continue
    yield lineno, example


def collect_examples(
  rows: Iterable[tuple[str, int, _T | BadRow]],
  bad_rows: str,
  source: str,
  *,
  what: str = "examples",
  unit: str = "row",
) -> tuple[list[_T], int]:
  """The examples of ``rows``, raising on the first bad row or skipping and counting them.

  Args:
    rows: ``(path, line, example or BadRow)`` in file order; consumed lazily,
      after ``bad_rows`` is checked.
    bad_rows: ``"error"`` or ``"skip"`` (``data.bad_rows``).
    source: the files, for the message when no example is left.
    what, unit: words of the messages (``"labelled examples"``; ``"pair"``).

  Returns:
    ``(examples, skipped)``.

  Raises:
    ValueError: an unknown ``bad_rows``.
    DataError: ``"<path>:<line>: <problem> (data.bad_rows='skip' skips such <unit>s)"``
      with ``bad_rows="error"``, or ``"no <what> in <source> (<n> bad <unit>(s) skipped)"``.
  """
  if bad_rows not in ("error", "skip"):
    raise ValueError(f"data.bad_rows={bad_rows!r} must be 'error' or 'skip'")
  examples, skipped = [], 0
  for path, line, example in rows:
    if isinstance(example, BadRow):
      if bad_rows == "error":
        raise DataError(f"{path}:{line}: {example} (data.bad_rows='skip' skips such {unit}s)")
      skipped += 1
      continue
    examples.append(example)
  if not examples:
    raise DataError(f"no {what} in {source} ({skipped} bad {unit}(s) skipped)")
  return examples, skipped


# ---------------------------------------------------------------- a run's splits


def hold_out(
  fraction: float, *columns: Sequence, what: str = "examples"
) -> tuple[tuple[list, ...], tuple[list, ...]]:
  """Splits aligned columns into training and validation examples, without randomness.

  Every ``k``-th example is held out, ``k = max(round(1 / fraction), 2)``
  (examples ``k-1, 2k-1, ...``), so the split is the same everywhere.

  Args:
    fraction: ``data.val_fraction``.
    columns: sequences of the same length ``N`` (texts, labels, ...).
    what: the examples' name in the error.

  Returns:
    ``(kept, held)``: one list per column in each.

  Raises:
    DataError: nothing is held out (``fraction == 0`` or too few examples).
  """
  n = len(columns[0])
  step = max(int(round(1 / fraction)), 2) if fraction > 0 else 0
  held = [bool(step) and i % step == step - 1 for i in range(n)]
  if not any(held):
    raise DataError(
      f"no validation {what}: set data.val_paths or data.val_fraction > 0 "
      f"(data.val_fraction={fraction})"
    )
  pick = lambda column, side: [x for x, h in zip(column, held) if h == side]
  return tuple(pick(c, False) for c in columns), tuple(pick(c, True) for c in columns)


def examples_sha256(*splits: Iterable[tuple[Any, Any]]) -> str:
  """Hex SHA-256 of the examples of each split: ``f"{a}\\t{b}\\n"`` per pair, ``\\0`` after
  each split. A resumed run compares it with its first run's, to see its data did not change."""
  h = hashlib.sha256()
  for split in splits:
    for a, b in split:
      h.update(f"{a}\t{b}\n".encode())
    h.update(b"\0")
  return h.hexdigest()


def run_tokenizer(
  cfg: DataConfig,
  workdir: str,
  train_texts: Sequence[str],
  tokenizer: Tokenizer | None = None,
  *,
  write: bool = True,
) -> Tokenizer:
  """The tokenizer of a run in ``workdir``.

  ``tokenizer`` when given (a fine-tuning run's source tokenizer), else the
  one in ``workdir`` (a resumed run), else a new ``cfg.tokenizer``: BPE is
  trained on ``train_texts`` to ``cfg.bpe_vocab_size``. It is saved as
  ``workdir/tokenizer.json`` unless ``write`` is False (evaluators never
  write into a run).

  Raises:
    DataError: ``workdir`` holds a tokenizer of another kind than ``cfg.tokenizer``.
  """
  path = os.path.join(workdir, TOKENIZER_FILE)
  if tokenizer is None and os.path.isfile(path):
    tokenizer = load_tokenizer(workdir)
    kind = "byte" if isinstance(tokenizer, ByteTokenizer) else "bpe"
    if kind != cfg.tokenizer:
      raise DataError(
        f"{path} holds a {kind} tokenizer but data.tokenizer={cfg.tokenizer!r}; "
        "use a new run directory"
      )
  elif tokenizer is None:
    tokenizer = build_tokenizer(cfg, train_texts)
  if write:
    tokenizer.save(workdir)
  return tokenizer


# ---------------------------------------------------------------- rows and batches


class ExampleRows:
  """Tokenised examples as fixed-width int32 arrays, indexed like a dict of arrays.

  ``rows[key]``, ``rows.keys()``, ``for key in rows``, ``dict(rows)`` give the
  arrays (also the batch keys), each ``np.int32[N, ...]``; ``len(rows)`` is
  ``N``, the number of examples, as for a grain data source.

  Attributes:
    fill: ``{key: value}`` of a padding row (a pad id, segment 0, target -1, ...);
      its keys, in order, are the arrays' keys.
    truncated: ``{key: n}``: how many examples lost tokens to fit the width of ``rows[key]``.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    fill: Mapping[str, int],
    truncated: Mapping[str, int] | None = None,
  ):
    self.fill = dict(fill)
    self.truncated = dict(truncated or {})
    if set(arrays) != set(self.fill):
      raise ValueError(f"arrays {sorted(arrays)} but fill values for {sorted(self.fill)}")
    self._arrays = {k: np.asarray(arrays[k], np.int32) for k in self.fill}
    shapes = {k: v.shape for k, v in self._arrays.items()}
    if not all(shapes.values()) or len({s[0] for s in shapes.values()}) != 1 or not len(self):
      raise ValueError(f"inconsistent example arrays: {shapes}")

  def __getitem__(self, key: str) -> np.ndarray:
    return self._arrays[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(next(iter(self._arrays.values())))

  def keys(self):
    return self._arrays.keys()

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks examples into a batch.

    Args:
      rows: ``int[b]`` example indices; one outside ``[0, N)`` gives a padding
        row (``fill``).

    Returns:
      ``{key: np.int32[b, ...]}``, the arrays' trailing shapes.
    """
    rows = np.asarray(rows, np.int64)
    valid = (rows >= 0) & (rows < len(self))
    idx = np.where(valid, rows, 0)
    out = {}
    for k, v in self._arrays.items():
      mask = valid.reshape(-1, *(1,) * (v.ndim - 1))
      out[k] = np.where(mask, v[idx], self.fill[k]).astype(np.int32)
    return out


def _local_slice(batch_size: int, process_index: int | None, process_count: int | None) -> slice:
  """This process's rows of a global batch."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count or not 0 <= index < count:
    raise ValueError(
      f"batch_size={batch_size} must be divisible by process_count={count}, "
      f"and process_index={index} must be in [0, {count})"
    )
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


def _batches(rows: Any, index_batches: grain.MapDataset, local: slice) -> grain.DatasetIterator:
  """Maps batches of global row indices to this process's stacked rows."""
  batches = index_batches.map(lambda idx: rows.gather(np.asarray(idx)[local]))
  return iter(batches.to_iter_dataset(_READ_OPTIONS))


def shuffled_batches(
  rows: Any,
  batch_size: int,
  seed: int = 0,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """An infinite iterator of training batches, reshuffled in every epoch.

  Args:
    rows: a row source: ``len(rows)`` and ``rows.gather(indices)`` (an
      :class:`ExampleRows`, a :class:`~llm_mp.data.packing.PackedRows`).
    batch_size: global rows per batch, divisible by ``process_count``.
    seed: shuffle seed in ``[0, 2**32)``.
    process_index: this process, default ``jax.process_index()``.
    process_count: processes sharing each batch, default ``jax.process_count()``.

  Returns:
    A grain ``DatasetIterator`` of ``rows.gather`` batches of
    ``batch_size / process_count`` rows, with ``get_state()``/``set_state()``.
    Batches may span an epoch boundary.
  """
  local = _local_slice(batch_size, process_index, process_count)
  order = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat()
  return _batches(rows, order.batch(batch_size, drop_remainder=True), local)


def ordered_batches(
  rows: Any,
  batch_size: int,
  max_batches: int | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """One ordered pass over a row source, for evaluation.

  Global batch ``b`` holds rows ``b * batch_size ...`` in order (so outputs
  line up with references); the last batch is completed with the source's
  padding rows (``gather`` of index -1: label/targets -1, segment ids 0), so
  every batch has the same shape and a masked mean counts each example once.
  ``max_batches`` stops early (None = all ``ceil(len(rows) / batch_size)``).
  Other arguments and the batches are as for :func:`shuffled_batches`.
  """
  local = _local_slice(batch_size, process_index, process_count)
  n_batches = -(-len(rows) // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  return _batches(rows, grain.MapDataset.range(n_batches * batch_size).batch(batch_size), local)
