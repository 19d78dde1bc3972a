"""Fixed splits of the public text-to-text sets the experiments use: Multi30k, BBC, SQuAD.

The three tasks of ``experiments/seq2seq.py`` (:func:`load_task_data`, files
under ``root``, by default ``../shared/data``; see ``shared/data/SOURCES.md``).
Every split is fixed by the files and by SHA-256 digests, never by a random
generator, so it is the same on every machine and Python version;
``SPLIT_SIZES`` pins the sizes:

* ``"translate"``: Multi30k task 1, German -> English by default
  (``direction="en-de"`` reverses it). ``train`` = ``train.{de,en}`` (29,000),
  ``validation`` = ``val.*`` (1,014), ``test`` = ``test_2016_flickr.*`` (1,000),
  the splits on which published Multi30k BLEU is reported.
* ``"summarize"``: BBC News Summary, article -> summary. No official split:
  an example's split is the first 8 bytes of the SHA-256 of its article (the
  UTF-8 text as in the file), a big-endian integer, mod 10: 0 -> ``test``,
  1 -> ``validation``, otherwise ``train`` (about 10/10/80%). Hashing the
  article rather than the id keeps the 98 pairs of duplicate articles on the
  same side. Sizes: train 1,765, validation 244, test 216. Examples keep the
  file's id order. The input is the whole article (its first line is the
  title); the summaries' sentences are joined without a space in the files
  (``"$10.9bn.For"``), so the space is put back where the article shows a
  sentence join (:func:`fix_summary_spacing`).
* ``"qa"``: SQuAD v1.1 dev (only the dev set is available), split by article
  so no paragraph is in two splits: the 48 articles sorted by the SHA-256 of
  their title, the first 10 -> ``test``, the next 4 -> ``validation``, the
  other 34 -> ``train``. Sizes (questions): train 8,391, validation 601, test
  1,578 (gold answers: 27,453 / 1,797 / 5,476). The small validation split
  serves in-training evaluation, so ``test`` is scored only at the end.
  Input ``"question: <q> context: <paragraph>"``, target the first gold
  answer, references all gold answers (duplicates kept, as the official
  script keeps them; its max over golds makes them harmless).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from llm_mp.data.corpus import clean_text
from llm_mp.data.examples import read_text, split_lines
from llm_mp.data.files import DataError
from llm_mp.data.text2text import TaskSplit, read_parallel

DEFAULT_ROOT = os.path.join("..", "shared", "data")
TASKS = ("translate", "summarize", "qa")
SPLITS = ("train", "validation", "test")
# Sizes of the fixed splits, pinned by tests/test_datasets.py.
SPLIT_SIZES = {
  "translate": {"train": 29_000, "validation": 1_014, "test": 1_000},
  "summarize": {"train": 1_765, "validation": 244, "test": 216},
  "qa": {"train": 8_391, "validation": 601, "test": 1_578},
}
QA_SPLIT_ARTICLES = {"test": 10, "validation": 4}  # the rest (34 of 48) is train


def _bucket(text: str, buckets: int) -> int:
  """A platform-independent bucket: the first 8 bytes of ``text``'s SHA-256, mod ``buckets``."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % buckets


_WHITESPACE = re.compile(r"\s+")
_JOIN_WINDOW = 12  # characters each side of a join that must match the article


def fix_summary_spacing(summary: str, article: str) -> str:
  """Puts back the space the BBC summaries lack between sentences: ``"bn.For"`` -> ``"bn. For"``.

  The summaries are extractive and their sentences are joined without a space,
  so a join is found by the article: a space is inserted at a point right
  after ``.``, ``!``, ``?`` or a quote when the 12 characters before it end a
  sentence in the article (are followed there by whitespace), the 12 after it
  begin one (follow whitespace), and the text with no space does not occur in
  the article. This tells ``'months."I think'`` (-> ``'months. "I think'``)
  from ``'"tuned".The'`` (-> ``'"tuned". The'``) and keeps ``"U.S."``,
  ``"10.9bn"`` and ``"A.D.,"`` whole. A sentence not found verbatim in the
  article (about 1%) keeps its joins.
  """
  text = " " + _WHITESPACE.sub(" ", article).strip() + " "
  out, last = [], 0
  for k in range(1, len(summary)):
    if summary[k - 1] not in ".!?\"'" or summary[k].isspace():
      continue
    left, right = summary[max(0, k - _JOIN_WINDOW) : k], summary[k : k + _JOIN_WINDOW]
    if left + " " in text and " " + right in text and left + right not in text:
      out += [summary[last:k], " "]
      last = k
  return "".join(out) + summary[last:]


def _translate(root: str, split: str, direction: str) -> TaskSplit:
  if direction not in ("de-en", "en-de"):
    raise ValueError(f"direction={direction!r} must be 'de-en' or 'en-de'")
  stem = {"train": "train", "validation": "val", "test": "test_2016_flickr"}[split]
  src, tgt = direction.split("-")
  base = os.path.join(root, "multi30k", stem)
  return read_parallel(f"{base}.{src}", f"{base}.{tgt}")[0]


def _summarize(root: str, split: str) -> TaskSplit:
  path = os.path.join(root, "bbc_summary", "bbc_summary.jsonl")
  wanted = {"test": 0, "validation": 1}.get(split)
  inputs, targets = [], []
  for lineno, line in enumerate(split_lines(read_text(path, "BBC summary")), 1):
    try:
      record = json.loads(line)
      article, summary = record["article"], record["summary"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
      raise DataError(
        f"{path}:{lineno}: expected an object with 'article' and 'summary' "
        f"({type(e).__name__}: {e})"
      ) from None
    bucket = _bucket(article, 10)
    if bucket == wanted or (wanted is None and bucket > 1):
      inputs.append(clean_text(article)[0])
      targets.append(fix_summary_spacing(clean_text(summary)[0], article))
  return TaskSplit(inputs, targets, [[t] for t in targets])


def qa_input(question: str, context: str) -> str:
  """The text-to-text form of a SQuAD question: ``"question: <q> context: <paragraph>"``."""
  return f"question: {question} context: {context}"


def qa_articles(root: str, split: str) -> list[dict]:
  """The SQuAD v1.1 dev articles of ``split`` (see the module docstring), as in the
  file (``{"title", "paragraphs"}``, raw text with its ``answer_start`` offsets), in
  file order."""
  path = os.path.join(root, "squad", "dev-v1.1.json")
  try:
    articles = json.loads(read_text(path, "SQuAD"))["data"]
  except (json.JSONDecodeError, TypeError, KeyError) as e:
    raise DataError(f"{path}: not a SQuAD v1.1 file ({type(e).__name__}: {e})") from None
  ranked = sorted(articles, key=lambda a: hashlib.sha256(a["title"].encode("utf-8")).digest())
  n_test, n_val = QA_SPLIT_ARTICLES["test"], QA_SPLIT_ARTICLES["validation"]
  chosen = {
    "test": ranked[:n_test],
    "validation": ranked[n_test : n_test + n_val],
    "train": ranked[n_test + n_val :],
  }[split]
  titles = {a["title"] for a in chosen}
  return [a for a in articles if a["title"] in titles]


def _qa(root: str, split: str) -> TaskSplit:
  inputs, refs = [], []
  for article in qa_articles(root, split):
    for paragraph in article["paragraphs"]:
      context = clean_text(paragraph["context"])[0]
      for qa in paragraph["qas"]:
        inputs.append(qa_input(clean_text(qa["question"])[0], context))
        refs.append([clean_text(a["text"])[0] for a in qa["answers"]])
  return TaskSplit(inputs, [r[0] for r in refs], refs)


def load_task_data(
  task: str, split: str, root: str = DEFAULT_ROOT, *, direction: str = "de-en"
) -> TaskSplit:
  """One fixed split of a text-to-text task (see the module docstring for the splits).

  Args:
    task: ``"translate"`` (Multi30k), ``"summarize"`` (BBC News Summary) or ``"qa"`` (SQuAD).
    split: ``"train"``, ``"validation"`` or ``"test"``.
    root: the directory holding ``multi30k/``, ``bbc_summary/`` and ``squad/``.
    direction: for ``"translate"``: ``"de-en"`` (German source) or ``"en-de"``.

  Returns:
    A :class:`TaskSplit` of ``SPLIT_SIZES[task][split]`` examples.

  Raises:
    ValueError: an unknown task, split or direction.
    DataError: a missing or malformed data file.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {TASKS}")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  if task == "translate":
    return _translate(root, split, direction)
  return _summarize(root, split) if task == "summarize" else _qa(root, split)
