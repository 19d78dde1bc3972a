"""SQuAD-format question answering data: questions with their context and answer
offsets, grouped by article, and question + context windows as token rows.

A row is ``question tokens, EOS, context tokens [a, a + room), EOS, padding``
(``segment_ids`` 1 on every real token, 0 on padding; ``context`` 1 on the
window's context tokens; ``match`` 1 on the context tokens inside a word that
the question also holds, lower-cased: DrQA's exact-match feature); a context
longer than the row is read in windows starting every ``doc_stride`` context
tokens. The tokenizer's character offsets
(:meth:`~llm_mp.data.Tokenizer.encode_offsets`) tie tokens to characters. The
``span`` task (``llm_mp.tasks.span``) trains and predicts on these rows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import numpy as np

from llm_mp.data.examples import (
  BadRow,
  ExampleRows,
  collect_examples,
  read_text,
)
from llm_mp.data.files import DataError
from llm_mp.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SpanExample:
  """One question: its context, gold answer texts and their character starts in the context."""

  question: str
  context: str
  answers: tuple[str, ...]
  starts: tuple[int, ...]


def _squad_question(context: str, qa: Any) -> SpanExample:
  if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
    raise BadRow("expected a question object with a 'question' string")
  answers = qa.get("answers")
  if not isinstance(answers, list) or not answers:
    raise BadRow("no answers")
  texts, starts = [], []
  for a in answers:
    text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
    if not isinstance(text, str) or not isinstance(start, int) or not text.strip():
      raise BadRow("an answer needs a non-empty 'text' and an integer 'answer_start'")
    if context[start : start + len(text)] != text:
      raise BadRow(f"answer_start={start} does not point at the answer {text!r}")
    texts.append(text)
    starts.append(start)
  return SpanExample(qa["question"], context, tuple(texts), tuple(starts))


def read_squad(paths: Sequence[str], bad_rows: str) -> tuple[list[list[SpanExample]], int]:
  """The questions of SQuAD-format files, grouped by article (file order).

  Args:
    paths: ``.json`` files in the SQuAD v1.1 layout (module docstring).
    bad_rows: ``"error"`` or ``"skip"`` a question without answers or whose
      ``answer_start`` does not point at its answer text.

  Returns:
    ``(articles, skipped)``: per article, its questions.

  Raises:
    DataError: a missing or malformed file, a bad question with ``bad_rows="error"``,
      or no question at all.
  """
  rows, article_of = [], []
  for path in paths:
    try:
      articles = json.loads(read_text(path, "SQuAD"))["data"]
      paragraphs = [
        ((path, i), p["context"], p["qas"]) for i, a in enumerate(articles) for p in a["paragraphs"]
      ]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
      raise DataError(f"{path}: not a SQuAD-format file ({type(e).__name__}: {e})") from None
    for k, (article, context, qas) in enumerate(paragraphs):
      for j, qa in enumerate(qas):
        try:
          example = _squad_question(context, qa)
          article_of.append(article)
        except BadRow as e:
          example = e
        rows.append((path, f"paragraph {k + 1} question {j + 1}", example))
  examples, skipped = collect_examples(
    rows, bad_rows, ", ".join(paths), what="questions", unit="question"
  )
  grouped: dict[Any, list[SpanExample]] = {}
  for key, example in zip(article_of, examples):
    grouped.setdefault(key, []).append(example)
  return list(grouped.values()), skipped


@dataclasses.dataclass(frozen=True)
class Windows:
  """The rows of one question (``W`` windows of its context).

  Attributes:
    inputs: int32 ``[W, T]`` token rows (layout in the module docstring).
    context: int32 ``[W, T]``, 1 on the window's context tokens.
    shift: int ``[W]``: context token ``k`` sits at row position ``k + shift[w]``.
    offsets: the ``(start, end)`` characters of each context token.
    match: int32 ``[W, T]``, 1 on the context tokens of a question word (:func:`word_match`).
  """

  inputs: np.ndarray
  context: np.ndarray
  shift: np.ndarray
  offsets: list[tuple[int, int]]
  match: np.ndarray


_WORD = re.compile(r"\w+")


def word_match(question: str, context: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
  """int32 ``[len(offsets)]``: 1 on the context tokens (characters ``offsets``) that
  overlap a word (``\\w+``, lower-cased) which the question also holds, else 0."""
  words = set(_WORD.findall(question.lower()))
  shared = np.zeros(len(context) + 1, np.int32)  # per character: inside a shared word
  for m in _WORD.finditer(context):
    if m.group(0).lower() in words:
      shared[m.start() : m.end()] = 1
  return np.asarray([shared[a:b].max(initial=0) for a, b in offsets], np.int32)


def encode_windows(
  tokenizer: Tokenizer, question: str, context: str, seq_len: int, doc_stride: int
) -> Windows:
  """A question's rows: the question (at most ``seq_len // 2`` tokens) with each window
  of its context; windows start every ``min(doc_stride, room)`` context tokens until one
  reaches the context's end (``room``: the context tokens a row holds)."""
  q = tokenizer.encode(question)[: seq_len // 2]
  ids, offsets = tokenizer.encode_offsets(context)
  room = seq_len - len(q) - 2
  stride = min(doc_stride, room)
  firsts = [0]
  while firsts[-1] + room < len(ids):
    firsts.append(firsts[-1] + stride)
  inputs = np.full((len(firsts), seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(firsts), seq_len), np.int32)
  match = np.zeros((len(firsts), seq_len), np.int32)
  shared = word_match(question, context, offsets)
  for w, a in enumerate(firsts):
    piece = ids[a : a + room]
    row = [*q, tokenizer.eos_id, *piece, tokenizer.eos_id]
    inputs[w, : len(row)] = row
    mask[w, len(q) + 1 : len(q) + 1 + len(piece)] = 1
    match[w, len(q) + 1 : len(q) + 1 + len(piece)] = shared[a : a + room]
  shift = len(q) + 1 - np.asarray(firsts)
  return Windows(inputs, mask, shift, offsets, match)


def answer_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
  """The first and last context tokens covering characters ``[start, end)``."""
  first = next(k for k, (_, e) in enumerate(offsets) if e > start)
  last = max(k for k, (s, _) in enumerate(offsets) if s < end)
  return first, last


def encode_examples(
  examples: Sequence[SpanExample], tokenizer: Tokenizer, seq_len: int, doc_stride: int
) -> ExampleRows:
  """Training rows: every window that holds an example's first gold answer, with the
  answer's row positions as ``starts`` / ``ends`` (arrays as :data:`BATCH_AXES`)."""
  keys = ("inputs", "segment_ids", "positions", "context", "match", "starts", "ends")
  out: dict[str, list] = {k: [] for k in keys}
  for ex in examples:
    win = encode_windows(tokenizer, ex.question, ex.context, seq_len, doc_stride)
    first, last = answer_tokens(win.offsets, ex.starts[0], ex.starts[0] + len(ex.answers[0]))
    for w in range(len(win.inputs)):
      s, e = first + win.shift[w], last + win.shift[w]
      if not (0 <= s <= e < seq_len and win.context[w, s] and win.context[w, e]):
        continue  # the answer is not (wholly) in this window
      out["inputs"].append(win.inputs[w])
      out["segment_ids"].append((win.inputs[w] != tokenizer.pad_id).astype(np.int32))
      out["positions"].append(np.arange(seq_len))
      out["context"].append(win.context[w])
      out["match"].append(win.match[w])
      out["starts"].append(s)
      out["ends"].append(e)
  fill = {"inputs": tokenizer.pad_id, "segment_ids": 0, "positions": 0, "context": 0, "match": 0}
  return ExampleRows({k: np.asarray(v) for k, v in out.items()}, {**fill, "starts": -1, "ends": -1})


# ---------------------------------------------------------------- prediction
