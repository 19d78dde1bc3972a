"""``lm``: next-token prediction for decoders, on packed rows of a text corpus."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

from llm_mp import data
from llm_mp.generate import generate_text
from llm_mp.tasks.base import (
  LM_BATCH_AXES,
  Batch,
  TaskData,
  TaskSpec,
  apply_model,
  loss_mask,
  token_loss,
)


def lm_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0):
  """Next-token prediction. ``batch``: int32 ``inputs, targets`` ``[B, T]``
  (targets -1 are ignored), optional ``segment_ids, positions`` ``[B, T]``."""
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    rng=rng,
  )
  return token_loss(
    logits, batch["targets"], loss_mask(batch), aux_loss, metrics, model_state, z_weight
  )


# --- a text corpus as packed rows (also the data of ``mlm``) ---------------------------------


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


def predict_continuation(
  run, texts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0
) -> list[str]:
  """The text a decoder writes after each prompt (greedy by default), clipped to
  the model's context."""
  out = []
  for text in texts:
    room = run.config.model.max_len - len(run.tokenizer.encode(text)) - 1  # -1: bos
    out.append(
      generate_text(
        run.config.model,
        run.precision,
        run.variables,
        run.tokenizer,
        text,
        max_new_tokens=max(min(max_new_tokens, room), 1),
        seed=seed,
        temperature=temperature,
      )
    )
  return out


SPEC = TaskSpec(
  name="lm",
  families=("decoder",),
  default_for=("decoder",),
  head="lm",
  batch_axes=LM_BATCH_AXES,
  make_loss=lambda config, tokenizer: functools.partial(lm_loss, z_weight=config.train.z_loss),
  data=CORPUS,
  predict=predict_continuation,
  continues_prompt=True,
)
