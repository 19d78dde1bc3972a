"""``span``: extractive question answering (SQuAD) for encoders.

One row holds a question and a window of its context::

  question tokens, EOS, context tokens [a, a + room), EOS, padding

with ``segment_ids`` 1 on every real token (question and context attend to
each other: the encoder's attention joins tokens of the same segment id) and 0
on padding; the ``context`` key marks the window's context tokens, the only
places a start or an end may fall. The question keeps at most half of
``data.seq_len`` tokens; a context longer than the rest is read in windows
starting every ``data.doc_stride`` context tokens (BERT's sliding windows).

The encoder's ``"span"`` head gives start and end logits per token (fp32);
the loss is the mean of the cross-entropy of the gold start and of the gold
end, over the context tokens. Training and validation rows are the windows
that contain the (first) gold answer. Prediction scores every window of a
question and keeps the span ``start <= end < start + data.max_answer_len``
with the highest ``start + end`` logit over all windows; the tokenizer's
character offsets (:meth:`~llm_mp.data.Tokenizer.encode_offsets`) map it back
to the context's characters, surrounding whitespace dropped.

Data: SQuAD v1.1-format ``.json`` files (``{"data": [{"title", "paragraphs":
[{"context", "qas": [{"question", "answers": [{"text", "answer_start"}]}]}]}]}``)
in ``data.paths``; validation from ``data.val_paths``, else every
``1/data.val_fraction``-th article is held out (no paragraph on both sides).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_mp.data.examples import (
  ExampleRows,
  examples_sha256,
  hold_out,
  run_tokenizer,
)
from llm_mp.data.files import DataError
from llm_mp.data.squad import (
  SpanExample,
  encode_examples,
  encode_windows,
  read_squad,
)
from llm_mp.data.tokenizer import Tokenizer
from llm_mp.tasks.base import TOKEN_AXES, Batch, TaskData, TaskSpec, apply_model, cross_entropy
from llm_mp.tasks.examples import example_eval_batches, example_train_batches, replace_val_files

BATCH_AXES = {
  "inputs": TOKEN_AXES,
  "segment_ids": TOKEN_AXES,
  "positions": TOKEN_AXES,
  "context": TOKEN_AXES,
  "match": TOKEN_AXES,
  "starts": ("batch",),
  "ends": ("batch",),
}
# Logit of a token that cannot start or end an answer: finite, so that a padding
# row (no context at all) gives a finite log-normaliser rather than NaN.
MASKED_LOGIT = -1e9


# ---------------------------------------------------------------- the loss


def span_logits(logits: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Start and end logits restricted to the context tokens.

  Args:
    logits: ``[B, T, 2]`` from the encoder's ``"span"`` head (any float dtype).
    context: ``[B, T]`` 0/1 or bool, the tokens an answer may cover.

  Returns:
    ``(start, end)``: fp32 ``[B, T]`` each (cast here: the softmax over the
    tokens is kept in fp32 under every policy), ``MASKED_LOGIT`` off the context.
  """
  logits = jnp.where(context.astype(bool)[..., None], logits.astype(jnp.float32), MASKED_LOGIT)
  return logits[..., 0], logits[..., 1]


def span_loss(model, variables, batch: Batch, rng):
  """Extractive QA. ``batch``: int32 ``inputs, segment_ids, positions, context, match [B, T]``
  and the gold ``starts, ends [B]`` (row positions; -1: a padding row, not counted);
  ``match`` is the encoder's token types (used where ``model.n_token_types`` > 0).

  Loss: ``(CE(start) + CE(end)) / 2`` averaged over the counted rows, fp32;
  ``exact`` in aux: the fraction of rows whose most likely start and end are both gold.
  """
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    types=batch.get("match"),
    rng=rng,
  )
  start, end = span_logits(logits, batch["context"])
  counted = batch["starts"] >= 0
  nll_start, _, count = cross_entropy(start, batch["starts"], counted)
  nll_end, _, _ = cross_entropy(end, batch["ends"], counted)
  n = jnp.maximum(count, 1.0)
  loss = (nll_start + nll_end) / (2 * n)
  exact = (
    (jnp.argmax(start, -1) == batch["starts"]) & (jnp.argmax(end, -1) == batch["ends"]) & counted
  )
  aux = {
    **metrics,
    "weight": count,
    "loss": loss,
    "exact": exact.sum(dtype=jnp.float32) / n,
    "model_state": model_state,
  }
  return loss + aux_loss, aux


# ---------------------------------------------------------------- examples and windows


def best_span(start: np.ndarray, end: np.ndarray, max_len: int) -> tuple[int, int, float]:
  """The span ``(i, j)`` with ``i <= j < i + max_len`` maximising ``start[i] + end[j]``.

  Args:
    start, end: float ``[T]`` logits (masked ones very negative, as :func:`span_logits`).
    max_len: the longest span, in tokens.

  Returns:
    ``(i, j, score)``.
  """
  score = start[:, None] + end[None, :]
  gap = np.arange(len(end))[None, :] - np.arange(len(start))[:, None]
  score = np.where((gap >= 0) & (gap < max_len), score, -np.inf)
  i, j = np.unravel_index(int(np.argmax(score)), score.shape)
  return int(i), int(j), float(score[i, j])


def extract_spans(
  logits_fn: Callable[[dict[str, np.ndarray]], Any],
  tokenizer: Tokenizer,
  questions: Sequence[str],
  contexts: Sequence[str],
  *,
  seq_len: int,
  doc_stride: int,
  max_answer_len: int,
  batch_size: int = 32,
) -> list[tuple[int, int]]:
  """The predicted answer of each question as characters ``[start, end)`` of its context.

  Args:
    logits_fn: ``batch -> [batch_size, seq_len, 2]`` span-head logits for a batch of
      int32 ``inputs, segment_ids, positions, match [batch_size, seq_len]`` (the last batch is
      padded to ``batch_size`` rows, so one compiled shape serves every call).
    tokenizer: the run's tokenizer.
    questions, contexts: ``N`` each.
    seq_len, doc_stride, max_answer_len: ``data.*`` of the run.

  Returns:
    ``N`` character spans: the best span over all windows of each question
    (:func:`best_span` on :func:`span_logits`), whitespace at either end dropped.
  """
  wins = [encode_windows(tokenizer, q, c, seq_len, doc_stride) for q, c in zip(questions, contexts)]
  inputs = np.concatenate([w.inputs for w in wins])
  masks = np.concatenate([w.context for w in wins])
  matches = np.concatenate([w.match for w in wins])
  start, end = np.empty(inputs.shape, np.float32), np.empty(inputs.shape, np.float32)
  for b in range(0, len(inputs), batch_size):
    rows = np.full((batch_size, seq_len), tokenizer.pad_id, np.int32)
    rows[: len(inputs[b : b + batch_size])] = inputs[b : b + batch_size]
    batch = {
      "inputs": rows,
      "segment_ids": (rows != tokenizer.pad_id).astype(np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), rows.shape),
    }
    context, match = np.zeros_like(rows), np.zeros_like(rows)
    context[: len(masks[b : b + batch_size])] = masks[b : b + batch_size]
    match[: len(matches[b : b + batch_size])] = matches[b : b + batch_size]
    batch["match"] = match
    s, e = span_logits(jnp.asarray(logits_fn(batch)), jnp.asarray(context))
    n = len(inputs[b : b + batch_size])
    start[b : b + n], end[b : b + n] = np.asarray(s)[:n], np.asarray(e)[:n]
  spans, row = [], 0
  for win, context in zip(wins, contexts):
    best = (-np.inf, 0, 0)
    for w in range(len(win.inputs)):
      i, j, score = best_span(start[row + w], end[row + w], max_answer_len)
      if score > best[0]:
        best = (score, i - win.shift[w], j - win.shift[w])
    row += len(win.inputs)
    _, first, last = best
    a, b = win.offsets[first][0], win.offsets[last][1]
    text = context[a:b]
    spans.append((a + len(text) - len(text.lstrip()), b - len(text) + len(text.rstrip())))
  return spans


def logits_function(run) -> Callable[[dict[str, np.ndarray]], jax.Array]:
  """A loaded run's span-head logits, jitted: ``batch -> [B, T, 2]`` (:func:`extract_spans`)."""
  variables = run.variables

  @jax.jit
  def logits(batch):
    out, *_ = apply_model(
      run.model,
      variables,
      batch["inputs"],
      segment_ids=batch["segment_ids"],
      positions=batch["positions"],
      types=batch["match"],
      rng=None,
    )
    return out

  return lambda batch: logits({k: jnp.asarray(v) for k, v in batch.items()})


def predict_answer(run, texts: Sequence[str]) -> list[str]:
  """The answer to each text ``"<question>\t<context>"`` (a tab after the question, so
  that one line of ``llm-mp predict``'s input holds one question)."""
  questions, contexts = zip(*(t.partition("\t")[::2] for t in texts)) if texts else ((), ())
  d = run.config.data
  spans = extract_spans(
    logits_function(run),
    run.tokenizer,
    questions,
    contexts,
    seq_len=d.seq_len,
    doc_stride=d.doc_stride,
    max_answer_len=d.max_answer_len,
    batch_size=run.config.train.batch_size,
  )
  return [c[a:b] for c, (a, b) in zip(contexts, spans)]


# ---------------------------------------------------------------- a run's data


@dataclasses.dataclass(frozen=True)
class PreparedSpans:
  """A run's span rows.

  Attributes:
    tokenizer: the run's tokenizer.
    train, val: the rows (windows holding the gold answer).
    val_examples: the validation questions (for EM/F1 by :func:`extract_spans`).
    source: the files; skipped: bad questions skipped; sha256: of every example.
  """

  tokenizer: Tokenizer
  train: ExampleRows
  val: ExampleRows
  val_examples: list[SpanExample]
  source: str
  skipped: int
  sha256: str = ""

  def __str__(self) -> str:
    return (
      f"span data: {self.source}; train {len(self.train):,} / val {len(self.val):,} "
      f"windows ({len(self.val_examples):,} validation questions), "
      f"{self.skipped} bad question(s) skipped"
    )


def prepare(config, workdir: str, tokenizer=None, write: bool = True) -> PreparedSpans:
  """Reads, splits, tokenises and windows the SQuAD-format files of ``config.data``.

  Raises:
    DataError: no ``data.paths``, or as :func:`read_squad`.
  """
  d = config.data
  if not d.paths:
    raise DataError("train.task='span' reads SQuAD-format .json files: set data.paths")
  articles, skipped = read_squad(d.paths, d.bad_rows)
  if d.val_paths:
    val_articles, val_skipped = read_squad(d.val_paths, d.bad_rows)
    skipped += val_skipped
  else:
    (articles,), (val_articles,) = hold_out(d.val_fraction, articles, what="articles")
  train = [ex for a in articles for ex in a]
  val = [ex for a in val_articles for ex in a]
  texts = list(dict.fromkeys(ex.context for ex in train)) + [ex.question for ex in train]
  tokenizer = run_tokenizer(d, workdir, texts, tokenizer, write=write)
  sha = examples_sha256(
    *(
      ((f"{ex.question}\t{ex.context}", f"{ex.starts}{ex.answers}") for ex in s)
      for s in (train, val)
    )
  )
  return PreparedSpans(
    tokenizer,
    encode_examples(train, tokenizer, d.seq_len, d.doc_stride),
    encode_examples(val, tokenizer, d.seq_len, d.doc_stride),
    val,
    ", ".join(d.paths),
    skipped,
    sha,
  )


SPEC = TaskSpec(
  name="span",
  families=("encoder",),
  head="span",
  batch_axes=BATCH_AXES,
  make_loss=lambda config, tokenizer: span_loss,
  data=TaskData(
    prepare,
    example_train_batches,
    example_eval_batches,
    lambda config, prepared: True,
    replace_val_files,
  ),
  predict=predict_answer,
  unit="examples",
  perplexity=False,
)
