"""The data functions shared by the tasks that read examples (``classify``,
``seq2seq``): prepared data with ``train`` and ``val`` rows of
``llm_mp.data.ExampleRows``, and validation files that a file list replaces."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from llm_mp import data


def example_train_batches(prepared, config):
  """Endless shuffled batches of the training examples (resumable)."""
  t = config.train
  return data.shuffled_batches(prepared.train, t.batch_size, t.seed)


def example_eval_batches(prepared, config, max_batches: int | None = None, split: str = "val"):
  """One ordered pass over ``split``'s examples, the last batch padded."""
  rows = prepared.train if split == "train" else prepared.val
  return data.ordered_batches(rows, config.train.batch_size, max_batches)


def replace_val_files(config, paths: Sequence[str]):
  """``config`` whose validation files are ``paths``, and the split to evaluate."""
  return dataclasses.replace(
    config, data=dataclasses.replace(config.data, val_paths=tuple(paths))
  ), "val"
