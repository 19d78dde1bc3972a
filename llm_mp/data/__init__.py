"""Text in, batches out: corpus cleaning, tokenizers, cached token files, packing, iterators.

Typical use by a training loop::

  prepared = prepare_data(cfg.data, workdir)   # tokenizer + token files under workdir
  print(prepared)                              # corpus summary, token counts, cache
  train_it = make_train_iterator(prepared, cfg.train.batch_size, cfg.train.seed)
  if resuming:
    train_it.set_state(saved_state)            # a dict from train_it.get_state()
  batch = next(train_it)   # {"inputs", "targets", "segment_ids", "positions"}: int32[B, T]
  for batch in make_eval_iterator(prepared, cfg.train.batch_size, cfg.train.eval_batches):
    ...

API:

* :func:`prepare_data` ``(cfg, workdir, tokenizer=None) -> PreparedData``
* :func:`make_train_iterator` ``(prepared, batch_size, seed=0, *, seq_len=None,
  process_index=None, process_count=None)``: infinite, shuffled, resumable.
* :func:`make_eval_iterator` ``(prepared, batch_size, max_batches=None, *,
  seq_len=None, process_index=None, process_count=None)``: one ordered, padded pass.
  ``seq_len=None`` means ``prepared.config.seq_len``; ``batch_size`` is global.
* :func:`load_corpus`, :func:`read_documents`, :func:`clean_documents`,
  :func:`default_corpus`: documents and a :class:`CorpusSummary`.
* :class:`Tokenizer`, :class:`ByteTokenizer`, :class:`BpeTokenizer`,
  :func:`build_tokenizer`, :func:`load_tokenizer`.
* :func:`read_labelled`, :func:`encode_labelled`, :func:`builtin_labelled`,
  :func:`prepare_labelled`: labelled text for classification (:mod:`llm_mp.data.labelled`).
* :func:`read_parallel`, :func:`read_text2text_jsonl`, :func:`build_text2text_tokenizers`,
  :func:`encode_text2text`, :func:`prepare_text2text`, :class:`TaskSplit`: text-to-text
  pairs for encoder-decoder runs (:mod:`llm_mp.data.text2text`).
* :class:`ExampleRows`, :func:`shuffled_batches` ``(rows, batch_size, seed=0, *,
  process_index=None, process_count=None)``, :func:`ordered_batches` ``(rows,
  batch_size, max_batches=None, *, ...)``: the rows of labelled and text-to-text
  examples and the training / evaluation batches of any row source
  (:mod:`llm_mp.data.examples`, which also holds what the example readers share).
* :func:`mlm_mask`, :func:`maskable_tokens`: BERT's masked-LM corruption
  (80% [MASK] = the pad id, 10% random, 10% kept), on device in the step.
* :func:`split_documents`, :func:`build_token_shards`, :class:`TokenSplit`,
  :class:`PackedRows`: the steps :func:`prepare_data` composes.

Every data problem raises :class:`DataError` (a ``ValueError``) with a
one-line message naming the file.
"""

from llm_mp.data.corpus import CorpusSummary, clean_documents, load_corpus, read_documents
from llm_mp.data.examples import ExampleRows, ordered_batches, shuffled_batches
from llm_mp.data.files import DataError
from llm_mp.data.labelled import (
  PreparedLabelled,
  builtin_labelled,
  encode_labelled,
  prepare_labelled,
  read_labelled,
)
from llm_mp.data.masking import maskable_tokens, mlm_mask
from llm_mp.data.packing import PackedRows
from llm_mp.data.pipeline import PreparedData, make_eval_iterator, make_train_iterator, prepare_data
from llm_mp.data.shards import TokenShards, TokenSplit, build_token_shards, split_documents
from llm_mp.data.stdlib_corpus import default_corpus
from llm_mp.data.text2text import (
  PreparedText2Text,
  TaskSplit,
  build_text2text_tokenizers,
  encode_text2text,
  load_text2text_tokenizers,
  prepare_text2text,
  read_parallel,
  read_text2text_jsonl,
  save_text2text_tokenizers,
)
from llm_mp.data.tokenizer import (
  BpeTokenizer,
  ByteTokenizer,
  Tokenizer,
  build_tokenizer,
  load_tokenizer,
)

__all__ = [
  "BpeTokenizer",
  "ByteTokenizer",
  "CorpusSummary",
  "DataError",
  "ExampleRows",
  "PackedRows",
  "PreparedData",
  "PreparedLabelled",
  "PreparedText2Text",
  "TaskSplit",
  "TokenShards",
  "TokenSplit",
  "Tokenizer",
  "build_text2text_tokenizers",
  "build_token_shards",
  "build_tokenizer",
  "builtin_labelled",
  "clean_documents",
  "default_corpus",
  "encode_labelled",
  "encode_text2text",
  "load_corpus",
  "load_text2text_tokenizers",
  "load_tokenizer",
  "make_eval_iterator",
  "make_train_iterator",
  "maskable_tokens",
  "mlm_mask",
  "ordered_batches",
  "prepare_data",
  "prepare_labelled",
  "prepare_text2text",
  "read_documents",
  "read_labelled",
  "read_parallel",
  "read_text2text_jsonl",
  "save_text2text_tokenizers",
  "shuffled_batches",
  "split_documents",
]
