"""Text-generation metrics for the text-to-text tasks, and the lead-3 summarisation baseline.

* :func:`bleu`: corpus BLEU (``sacrebleu``, its default 13a tokenisation) of
  detokenised text, as reported for translation (Multi30k test2016).
* :func:`rouge`: mean ROUGE-1/2/L F-measures (``rouge-score``, Porter stemming).
* :func:`rouge_paired_minus_shuffled`: how much a summary owes to its own article.
* :func:`squad_em_f1`: exact match and token F1 with the official SQuAD v1.1
  answer normalisation, implemented here (the official script is 50 lines and
  not a package); max over the gold answers, mean over questions.
* :func:`lead3`: the first three sentences of an article.

Every score is a percentage in ``[0, 100]``, as papers report them. The
packages are the optional ``seq2seq`` extra (``pip install llm_mp[seq2seq]``)
and are imported on first use.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence


def _check_lengths(hyps: Sequence, refs: Sequence, what: str) -> None:
  if len(hyps) != len(refs):
    raise ValueError(f"{what}: {len(hyps)} predictions but {len(refs)} references")
  if not len(hyps):
    raise ValueError(f"{what}: no predictions to score")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus BLEU of ``hyps[i]`` against the single reference ``refs[i]``.

  Args:
    hyps, refs: ``N`` detokenised strings each (as a tokenizer's ``decode``
      gives them; sacrebleu tokenises with its standard 13a rules).

  Returns:
    BLEU in ``[0, 100]`` (sacrebleu's ``corpus_bleu(...).score``).
  """
  import sacrebleu

  _check_lengths(hyps, refs, "bleu")
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE F-measures of ``hyps[i]`` against ``refs[i]``.

  ``rouge-score``'s tokenizer lower-cases and keeps ``[a-z0-9]`` runs, with
  Porter stemming on; ``rougeL`` is the longest common subsequence over the
  whole text (no sentence splitting).

  Returns:
    ``{"rouge1", "rouge2", "rougeL"}``: percentages, averaged over examples.
  """
  from rouge_score import rouge_scorer

  _check_lengths(hyps, refs, "rouge")
  keys = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  totals = dict.fromkeys(keys, 0.0)
  for hyp, ref in zip(hyps, refs):
    scores = scorer.score(ref, hyp)  # (target, prediction)
    for k in keys:
      totals[k] += scores[k].fmeasure
  return {k: 100.0 * v / len(hyps) for k, v in totals.items()}


def rouge_paired_minus_shuffled(
  hyps: Sequence[str], refs: Sequence[str], key: str = "rouge2"
) -> dict[str, float]:
  """The test of reading: ROUGE of each output against its own reference, against the
  reference of another example (``refs`` rotated by one), and their difference.

  A model that writes the summaries' language without reading the article scores the
  same on both (its output fits any reference as well as its own); only what comes from
  the article makes the difference positive.

  Returns:
    ``{"paired", "shuffled", "difference"}``: percentages of ``key`` (averaged over
    examples; at least two are needed).
  """
  _check_lengths(hyps, refs, "rouge_paired_minus_shuffled")
  if len(refs) < 2:
    raise ValueError("rouge_paired_minus_shuffled: needs at least 2 examples to shuffle")
  paired = rouge(hyps, refs)[key]
  shuffled = rouge(hyps, [*refs[1:], refs[0]])[key]
  return {"paired": paired, "shuffled": shuffled, "difference": paired - shuffled}


# ---------------------------------------------------------------- SQuAD v1.1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 normalisation: lower-case, drop ASCII punctuation, drop the
  articles a/an/the, collapse whitespace (in that order, as ``evaluate-v1.1.py``)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = collections.Counter(pred) & collections.Counter(ref)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad_em_f1(preds: Sequence[str], golds_list: Sequence[Sequence[str]]) -> dict[str, float]:
  """Exact match and F1 as the official SQuAD v1.1 script computes them.

  Args:
    preds: ``N`` predicted answers.
    golds_list: ``N`` non-empty lists of gold answers.

  Returns:
    ``{"exact_match", "f1"}``: percentages; per question the max over its golds
    of (normalised strings equal) and of the bag-of-tokens F1 of the normalised
    texts, then the mean over questions.
  """
  _check_lengths(preds, golds_list, "squad_em_f1")
  em = f1 = 0.0
  for i, (pred, golds) in enumerate(zip(preds, golds_list)):
    if isinstance(golds, str) or not golds:
      raise ValueError(f"squad_em_f1: golds_list[{i}]={golds!r} must be a non-empty list")
    em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
    f1 += max(_f1(pred, g) for g in golds)
  return {"exact_match": 100.0 * em / len(preds), "f1": 100.0 * f1 / len(preds)}


# ---------------------------------------------------------------- lead-3

# A sentence ends at ., ! or ? (maybe followed by closing quotes or brackets) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")


def sentences(text: str) -> list[str]:
  """Splits ``text`` into sentences: at line breaks (a title line is a sentence) and after
  ``.``, ``!`` or ``?`` (and any closing quotes or brackets) followed by whitespace."""
  out = []
  for line in text.splitlines():
    start = 0
    for m in _SENTENCE_END.finditer(line):
      out.append(line[start : m.start() + len(m.group(0).rstrip())].strip())
      start = m.end()
    out.append(line[start:].strip())
  return [s for s in out if s]


def lead3(article: str, skip_title: bool = False) -> str:
  """The first three sentences of ``article`` (see :func:`sentences`), joined by spaces.

  ``skip_title`` drops the first line first: a BBC article's first line is its
  headline, which the reference summaries never contain.
  """
  if skip_title:
    article = article.split("\n", 1)[1] if "\n" in article else ""
  return " ".join(sentences(article)[:3])
