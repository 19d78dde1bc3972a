"""The data of the token-level tasks (``lm``, ``mlm``): a text corpus cleaned, split,
tokenised into token files and packed into rows (``llm_mp.data.pipeline``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from llm_mp import data
from llm_mp.tasks.base import TaskData


def prepare_corpus(config, workdir: str, tokenizer: Any = None, write: bool = True):
  """The corpus of ``config.data`` cleaned, split, tokenised into token files."""
  return data.prepare_data(config.data, workdir, tokenizer=tokenizer, write=write)


def corpus_train_batches(prepared, config):
  return data.make_train_iterator(prepared, config.train.batch_size, config.train.seed)


def corpus_eval_batches(prepared, config, max_batches: int | None = None, split: str = "val"):
  if split == "train":  # files given to evaluate: all of their text counts
    prepared = dataclasses.replace(prepared, val=prepared.train)
  return data.make_eval_iterator(prepared, config.train.batch_size, max_batches)


def check_corpus_rows(config, prepared) -> bool:
  """The training split packs into rows; evaluation has text unless
  ``data.val_fraction=0`` (then it is off)."""
  data.PackedRows(prepared.train, config.data.seq_len, prepared.tokenizer.pad_id)
  if config.data.val_fraction == 0:
    return False
  if prepared.val.num_tokens < 2:
    raise ValueError(
      f"data.val_fraction={config.data.val_fraction} leaves no validation text "
      f"({prepared.summary.documents} document(s)); add data, or set "
      "data.val_fraction=0 to train without evaluation"
    )
  return True


def corpus_on_files(config, paths: Sequence[str]):
  """Every document of ``paths`` counts: no validation split is held out of them."""
  d = dataclasses.replace(config.data, paths=tuple(paths), val_fraction=0.0)
  return dataclasses.replace(config, data=d), "train"


CORPUS = TaskData(
  prepare=prepare_corpus,
  train_batches=corpus_train_batches,
  eval_batches=corpus_eval_batches,
  check=check_corpus_rows,
  on_files=corpus_on_files,
)
