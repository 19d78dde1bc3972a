"""``classify``: sequence classification for encoders, on labelled examples."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from llm_mp import data
from llm_mp.tasks.base import (
  TOKEN_AXES,
  Batch,
  TaskData,
  TaskSpec,
  apply_model,
  apply_to_tokens,
  cross_entropy,
  packed_rows,
  random_tokens,
)
from llm_mp.tasks.examples import example_eval_batches, example_train_batches, replace_val_files

BATCH_AXES = {
  "inputs": TOKEN_AXES,
  "segment_ids": TOKEN_AXES,
  "positions": TOKEN_AXES,
  "labels": ("batch",),
}


def classify_loss(model, variables, batch: Batch, rng):
  """Sequence classification. ``batch``: int32 ``inputs, segment_ids,
  positions [B, T]`` and ``labels [B]`` (-1: a padding row, not counted).
  Cross-entropy over the class logits in fp32; ``accuracy`` in aux."""
  logits, aux_loss, metrics, model_state = apply_to_tokens(model, variables, batch, rng)
  labels = batch["labels"]
  nll, _, count = cross_entropy(logits, labels, jnp.ones_like(labels, bool))
  n = jnp.maximum(count, 1.0)
  correct = ((jnp.argmax(logits, -1) == labels) & (labels >= 0)).sum(dtype=jnp.float32)
  aux = {
    **metrics,
    "weight": count,
    "loss": nll / n,
    "accuracy": correct / n,
    "model_state": model_state,
  }
  return nll / n + aux_loss, aux


def prepare(config, workdir: str, tokenizer=None, write: bool = True):
  """The labelled examples of ``config.data`` (``llm_mp.data.labelled``)."""
  return data.prepare_labelled(
    config.data, workdir, tokenizer=tokenizer, write=write, n_classes=config.model.n_classes
  )


def check(config, prepared) -> bool:
  """The classifier has an output for every class of the data."""
  if len(prepared.label_names) > config.model.n_classes:
    raise ValueError(
      f"model.n_classes={config.model.n_classes} is smaller than the "
      f"{len(prepared.label_names)} classes of the data {list(prepared.label_names)}"
    )
  return True  # prepare_labelled checked the validation split has examples


def predict_label(run, texts: Sequence[str]) -> list[str]:
  """The most likely class name of each text (class names from the run's data)."""
  names = prepare(run.config, run.workdir, run.tokenizer, write=False).label_names
  rows, _ = data.encode_labelled(
    texts, np.zeros(len(texts), np.int32), run.tokenizer, run.config.data.seq_len
  )
  batch = {k: jnp.asarray(rows[k]) for k in ("inputs", "segment_ids", "positions")}
  logits, *_ = apply_model(
    run.model,
    run.variables,
    batch["inputs"],
    segment_ids=batch["segment_ids"],
    positions=batch["positions"],
    rng=None,
  )
  return [
    names[i] if i < len(names) else str(i) for i in np.asarray(jnp.argmax(logits, -1)).tolist()
  ]


def synthetic_batch(config, batch_size: int) -> Batch:
  """Random tokens ``[batch_size, data.seq_len]`` (numpy seed 0), one example per row,
  with random ``labels [batch_size]`` in ``[0, model.n_classes)``."""
  tokens = random_tokens(batch_size, config.data.seq_len + 1, config.model.vocab_size)
  labels = tokens[:, -1] % config.model.n_classes
  return {**packed_rows(tokens[:, :-1]), "labels": jnp.asarray(labels, jnp.int32)}


SPEC = TaskSpec(
  name="classify",
  families=("encoder",),
  head="classify",
  batch_axes=BATCH_AXES,
  make_loss=lambda config, tokenizer: classify_loss,
  data=TaskData(prepare, example_train_batches, example_eval_batches, check, replace_val_files),
  predict=predict_label,
  unit="examples",
  perplexity=False,
  synthetic_batch=synthetic_batch,
)
