"""From a DataConfig to batches: prepare once, then iterate with grain.

:func:`prepare_data` runs corpus -> cleaning -> split -> tokenizer -> cached
token files and returns a :class:`PreparedData`. :func:`make_train_iterator`
and :func:`make_eval_iterator` turn it into grain iterators of batches::

  {"inputs", "targets", "segment_ids", "positions"}: np.int32[B_local, T]

(see :mod:`llm_mp.data.packing`), where ``B_local = batch_size /
process_count``: every process gets its own contiguous, disjoint slice of
each global batch, in process order, so the global batch is the
concatenation of the processes' batches.

The training iterator is infinite and shuffles rows with ``seed``, differently
in each epoch; the evaluation iterator is one ordered pass over the
validation rows, its last batch filled with padding rows (all targets -1).
Both are deterministic and resumable: ``it.get_state()`` is a small JSON-able
dict and ``it.set_state(state)`` on a fresh iterator made with the same
arguments continues exactly where the saved one stopped. With orbax,
``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` store and
restore that dict as JSON, one file per process.
"""

from __future__ import annotations

import dataclasses
import os

import grain

from llm_mp.config import DataConfig
from llm_mp.data.corpus import CorpusSummary, load_corpus
from llm_mp.data.examples import ordered_batches, run_tokenizer, shuffled_batches
from llm_mp.data.packing import PackedRows
from llm_mp.data.shards import TokenSplit, build_token_shards, corpus_sha256, split_documents
from llm_mp.data.tokenizer import ByteTokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A tokenised corpus, ready to be packed into batches.

  Attributes:
    config: the DataConfig it was prepared from.
    tokenizer: the tokenizer, also saved as ``<workdir>/tokenizer.json``.
    train: the training token stream (memory-mapped).
    val: the validation token stream (memory-mapped; empty when
      ``val_fraction == 0`` or there is a single document).
    summary: what corpus cleaning kept and removed.
    cache_dir: the directory holding the token files.
    reused: True if the token files came from the cache untouched.
    sha256: hex SHA-256 of the cleaned corpus (all documents, before the split):
      a resumed run checks that its text did not change.
  """

  config: DataConfig
  tokenizer: Tokenizer
  train: TokenSplit
  val: TokenSplit
  summary: CorpusSummary
  cache_dir: str
  reused: bool
  sha256: str = ""

  def __str__(self) -> str:
    """Two lines for a log: the corpus summary, then tokens and cache."""
    kind = "byte" if isinstance(self.tokenizer, ByteTokenizer) else "bpe"
    total = self.train.num_tokens + self.val.num_tokens
    return (
      f"{self.summary}\n"
      f"tokens: train {self.train.num_tokens:,} ({self.train.num_docs} docs), "
      f"val {self.val.num_tokens:,} ({self.val.num_docs} docs, "
      f"{100 * self.val.num_tokens / max(total, 1):.1f}% of tokens); "
      f"tokenizer {kind}, vocab {self.tokenizer.vocab_size}; "
      f"{'reused' if self.reused else 'wrote'} {self.cache_dir}"
    )


def prepare_data(
  cfg: DataConfig, workdir: str, tokenizer: Tokenizer | None = None, write: bool = True
) -> PreparedData:
  """Reads, cleans, splits and tokenises the corpus of ``cfg``, caching under ``workdir``.

  Args:
    cfg: the data section of the run's config.
    workdir: the run directory. The tokenizer is saved to
      ``workdir/tokenizer.json`` and the token files under ``workdir/data/``.
    tokenizer: use this tokenizer instead. Without it, the one already in
      ``workdir`` is reused (a resumed run), else one is built from ``cfg``
      (BPE is trained on the training documents only).
    write: False writes nothing under ``workdir`` (no tokenizer.json, no token
      files; a cached entry is still read): for evaluators of a finished,
      possibly read-only, run directory.

  Returns:
    A :class:`PreparedData`; ``print(prepared)`` shows a two-line summary.

  Raises:
    DataError: a corpus problem (see :func:`~llm_mp.data.corpus.load_corpus`),
      or ``workdir`` holds a tokenizer of another kind than ``cfg.tokenizer``.
  """
  docs, summary = load_corpus(cfg)
  train_docs, val_docs = split_documents(docs, cfg.val_fraction)
  tokenizer = run_tokenizer(cfg, workdir, train_docs, tokenizer, write=write)
  shards = build_token_shards(
    train_docs, val_docs, tokenizer, os.path.join(workdir, "data"), write=write
  )
  return PreparedData(
    cfg,
    tokenizer,
    shards.train,
    shards.val,
    summary,
    shards.directory,
    shards.reused,
    corpus_sha256(docs),
  )


def _rows(prepared: PreparedData, split: TokenSplit, seq_len: int | None) -> PackedRows:
  seq_len = prepared.config.seq_len if seq_len is None else seq_len
  return PackedRows(split, seq_len, prepared.tokenizer.pad_id)


def make_train_iterator(
  prepared: PreparedData,
  batch_size: int,
  seed: int = 0,
  *,
  seq_len: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """An infinite, shuffled iterator of training batches.

  Args:
    prepared: from :func:`prepare_data`.
    batch_size: global rows per batch, divisible by ``process_count``.
    seed: shuffle seed in ``[0, 2**32)``; each epoch is shuffled differently.
    seq_len: tokens per row, ``T``; default ``prepared.config.seq_len``.
    process_index: this process, default ``jax.process_index()``.
    process_count: processes sharing each batch, default ``jax.process_count()``.

  Returns:
    A grain ``DatasetIterator`` of dicts of ``np.int32[batch_size / process_count, T]``
    with ``get_state()``/``set_state()``. Batches may span an epoch boundary.
  """
  rows = _rows(prepared, prepared.train, seq_len)
  return shuffled_batches(
    rows, batch_size, seed, process_index=process_index, process_count=process_count
  )


def make_eval_iterator(
  prepared: PreparedData,
  batch_size: int,
  max_batches: int | None = None,
  *,
  seq_len: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """One ordered pass over the validation rows.

  Arguments are as for :func:`make_train_iterator`; ``max_batches`` stops
  early (None = the whole validation split). The last batch is completed with
  padding rows (``targets == -1`` everywhere), so every batch has the same
  shape and a masked mean over all batches weighs every target once.

  Raises:
    DataError: the validation split is empty.
  """
  rows = _rows(prepared, prepared.val, seq_len)
  return ordered_batches(
    rows, batch_size, max_batches, process_index=process_index, process_count=process_count
  )
