"""``lm``: next-token prediction for decoders, on packed rows of a text corpus."""

from __future__ import annotations

import functools
from typing import Sequence

from llm_mp.generate import encode_prompt, generate_text
from llm_mp.tasks.base import (
  LM_BATCH_AXES,
  Batch,
  TaskSpec,
  apply_to_tokens,
  loss_mask,
  token_loss,
)
from llm_mp.tasks.corpus import CORPUS


def lm_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0):
  """Next-token prediction. ``batch``: int32 ``inputs, targets`` ``[B, T]``
  (targets -1 are ignored), optional ``segment_ids, positions`` ``[B, T]``."""
  logits, aux_loss, metrics, model_state = apply_to_tokens(model, variables, batch, rng)
  return token_loss(
    logits, batch["targets"], loss_mask(batch), aux_loss, metrics, model_state, z_weight
  )


def predict_continuation(
  run, texts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0
) -> list[str]:
  """The text a decoder writes after each prompt (greedy by default), clipped to
  the model's context."""
  out = []
  for text in texts:
    room = run.config.model.max_len - len(encode_prompt(run.tokenizer, text))
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
