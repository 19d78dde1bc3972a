"""``seq2seq``: teacher-forced text-to-text for encoder-decoders (translation,
summarisation, generative question answering)."""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from llm_mp.data import text2text
from llm_mp.generate import generate_seq2seq
from llm_mp.tasks.base import (
  TOKEN_AXES,
  Batch,
  TaskData,
  TaskSpec,
  apply_model,
  packed_rows,
  random_tokens,
  token_loss,
)
from llm_mp.tasks.examples import example_eval_batches, example_train_batches, replace_val_files

# Source and target lengths may differ; both are ("batch", "length") (length is not sharded).
SEQ2SEQ_BATCH_AXES: Mapping[str, tuple[str, ...]] = {
  "inputs": TOKEN_AXES,
  "segment_ids": TOKEN_AXES,
  "positions": TOKEN_AXES,
  "decoder_inputs": TOKEN_AXES,
  "decoder_segment_ids": TOKEN_AXES,
  "decoder_positions": TOKEN_AXES,
  "targets": TOKEN_AXES,
}


def seq2seq_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0):
  """Teacher-forced text-to-text. ``batch``: int32 source ``inputs, segment_ids
  [B, S]``, target ``decoder_inputs, decoder_segment_ids, targets [B, T]``
  (``decoder_inputs`` = BOS + targets shifted right; ``targets`` -1 and
  ``decoder_segment_ids`` 0 on padding, neither counted), optional
  ``positions [B, S]`` / ``decoder_positions [B, T]``. Mean cross-entropy
  over the real target tokens; ``accuracy`` (argmax == target) in aux."""
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    decoder_inputs=batch["decoder_inputs"],
    decoder_segment_ids=batch.get("decoder_segment_ids"),
    positions=batch.get("positions"),
    decoder_positions=batch.get("decoder_positions"),
    rng=rng,
  )
  targets = batch["targets"]
  mask = targets >= 0
  if "decoder_segment_ids" in batch:
    mask &= batch["decoder_segment_ids"] > 0
  loss, aux = token_loss(logits, targets, mask, aux_loss, metrics, model_state, z_weight)
  correct = ((jnp.argmax(logits, -1) == targets) & mask).sum(dtype=jnp.float32)
  aux["accuracy"] = correct / jnp.maximum(aux["weight"], 1.0)
  return loss, aux


def prepare(config, workdir: str, tokenizer=None, write: bool = True):
  """The text-to-text pairs of ``config.data`` (``llm_mp.data.text2text``)."""
  return text2text.prepare_text2text(config.data, workdir, tokenizer=tokenizer, write=write)


def encode_sources(tokenizer, texts: Sequence[str], seq_len: int) -> np.ndarray:
  """int32 ``[N, seq_len]`` source rows: tokens, EOS, then padding (clipped)."""
  rows = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
  for j, ids in enumerate(tokenizer.encode_batch(list(texts))):
    ids = (list(ids) + [tokenizer.eos_id])[:seq_len]
    rows[j, : len(ids)] = ids
  return rows


def predict_output(
  run,
  texts: Sequence[str],
  max_new_tokens: int | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
) -> list[str]:
  """The output text for each source text (greedy, or beam search with ``beam_size > 1``)."""
  tok, cfg = run.tokenizer, run.config
  rows = encode_sources(tok, texts, cfg.data.seq_len)
  tokens = generate_seq2seq(
    cfg.model,
    run.precision,
    run.params,
    jnp.asarray(rows),
    jnp.asarray((rows != tok.pad_id).astype(np.int32)),
    max_new_tokens=max_new_tokens or cfg.data.target_len or cfg.data.seq_len,
    bos_id=tok.bos_id,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
    beam_size=beam_size,
    length_penalty=length_penalty,
  )
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
    out.append(tok.decode(row).strip())
  return out


def synthetic_batch(config, batch_size: int) -> Batch:
  """Random source rows ``[batch_size, data.seq_len]`` and target rows ``[batch_size,
  data.target_len or data.seq_len]`` (numpy seed 0), one pair per row, without padding;
  ``decoder_inputs`` are the targets shifted right after a random first token."""
  source_len = config.data.seq_len
  target_len = config.data.target_len or source_len
  tokens = random_tokens(batch_size, source_len + target_len + 1, config.model.vocab_size)
  target = packed_rows(tokens[:, source_len : source_len + target_len])
  return {
    **packed_rows(tokens[:, :source_len]),
    **{f"decoder_{key}": value for key, value in target.items()},
    "targets": jnp.asarray(tokens[:, source_len + 1 :], jnp.int32),
  }


SPEC = TaskSpec(
  name="seq2seq",
  families=("encoder_decoder",),
  default_for=("encoder_decoder",),
  head="lm",
  batch_axes=SEQ2SEQ_BATCH_AXES,
  make_loss=lambda config, tokenizer: functools.partial(seq2seq_loss, z_weight=config.train.z_loss),
  data=TaskData(
    prepare,
    example_train_batches,
    example_eval_batches,
    lambda config, prepared: True,
    replace_val_files,
  ),
  predict=predict_output,
  synthetic_batch=synthetic_batch,
)
