"""``mlm``: masked language modelling (BERT) for encoders, on packed corpus rows."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_mp.data.masking import mlm_mask
from llm_mp.tasks.base import (
  LM_BATCH_AXES,
  Batch,
  TaskSpec,
  apply_model,
  apply_to_tokens,
  token_loss,
)
from llm_mp.tasks.corpus import CORPUS

# Eval batches are masked with this fixed key, so evaluations of different
# checkpoints see the same masked positions and are comparable.
_EVAL_MASK_SEED = 0


def mask_batch(
  batch: Batch,
  rng,
  *,
  probability: float,
  mask_id: int,
  random_ids: tuple[int, int],
  special_ids: tuple[int, ...],
):
  """The BERT corruption of ``batch["inputs"] [B, T]``: a random ``probability``
  of the real, non-special tokens is selected (80% -> ``mask_id``, 10% -> a
  random token id in ``[random_ids[0], random_ids[1])``, 10% kept).

  Returns:
    ``(masked, targets, dropout_rng)``: int32 ``[B, T]`` model inputs, int32
    ``[B, T]`` targets (the original id at selected positions, -1 elsewhere),
    and the dropout key (None in evaluation, ``rng`` None: then the masks come
    from a fixed key).
  """
  inputs = batch["inputs"]
  maskable = ~jnp.isin(inputs, jnp.asarray(special_ids, inputs.dtype))
  if "segment_ids" in batch:
    maskable &= batch["segment_ids"] > 0
  if rng is None:
    mask_rng, dropout_rng = jax.random.key(_EVAL_MASK_SEED), None
  else:
    mask_rng, dropout_rng = jax.random.split(rng)
  masked, targets = mlm_mask(
    mask_rng,
    inputs,
    maskable,
    probability=probability,
    mask_id=mask_id,
    low=random_ids[0],
    vocab_size=random_ids[1],
  )
  return masked, targets, dropout_rng


def mlm_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0, **masking):
  """Masked LM (BERT): the positions :func:`mask_batch` selects (``masking``:
  its keyword arguments) are predicted; the loss counts them only. ``batch`` as
  for :func:`lm_loss` (``targets`` unused)."""
  masked, targets, dropout_rng = mask_batch(batch, rng, **masking)
  logits, aux_loss, metrics, model_state = apply_to_tokens(
    model, variables, batch, dropout_rng, inputs=masked
  )
  return token_loss(logits, targets, targets >= 0, aux_loss, metrics, model_state, z_weight)


def masking_options(tokenizer) -> dict:
  """:func:`mask_batch`'s keyword arguments but ``probability`` for ``tokenizer``:
  the pad id doubles as [MASK] (see ``llm_mp.data.masking``); random replacements
  are ordinary tokens (the specials sit at the start, BPE: 0..2, or the end,
  bytes: 256..258, of the vocabulary).

  Raises:
    ValueError: no tokenizer.
  """
  if tokenizer is None:
    raise ValueError("masked LM needs the tokenizer (its pad/bos/eos ids)")
  tok = tokenizer
  specials = sorted((tok.pad_id, tok.bos_id, tok.eos_id))
  low, high = (specials[-1] + 1, tok.vocab_size) if specials[0] == 0 else (0, specials[0])
  return {"mask_id": tok.pad_id, "random_ids": (low, high), "special_ids": tuple(specials)}


def make_mlm_loss(config, tokenizer):
  """:func:`mlm_loss` with the run's masking probability and the tokenizer's
  special ids (:func:`masking_options`).

  Raises:
    ValueError: no tokenizer.
  """
  return functools.partial(
    mlm_loss,
    probability=config.train.mlm_probability,
    z_weight=config.train.z_loss,
    **masking_options(tokenizer),
  )


def predict_reconstruction(run, texts: Sequence[str]) -> list[str]:
  """The encoder's most likely token at every position of each text (its
  reconstruction: the input where the model agrees with it), clipped to
  ``data.seq_len``; the pad id in a text's place marks a position to fill."""
  tok, seq_len = run.tokenizer, run.config.data.seq_len
  out = []
  for text in texts:
    ids = ([tok.bos_id] + list(tok.encode(text)) + [tok.eos_id])[:seq_len]
    inputs = jnp.asarray([ids], jnp.int32)
    logits, *_ = apply_model(run.model, run.variables, inputs, rng=None)
    best = np.asarray(jnp.argmax(logits[0, 1 : len(ids) - 1], -1)).tolist()
    out.append(tok.decode(best))
  return out


SPEC = TaskSpec(
  name="mlm",
  families=("encoder",),
  default_for=("encoder",),
  head="lm",
  batch_axes=LM_BATCH_AXES,
  make_loss=make_mlm_loss,
  data=CORPUS,
  predict=predict_reconstruction,
)
