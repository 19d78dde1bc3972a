"""Classification yardsticks on the host: accuracy and macro-F1, and a bag-of-words baseline.

Everything here is NumPy (and SciPy, which JAX itself depends on, for sparse
matrices and L-BFGS); nothing is jitted, so it runs beside any training run.

* :func:`classification_metrics` ``(pred, labels, n_classes) -> {"accuracy", "macro_f1"}``
* :func:`bow_logistic_regression` ``(train_texts, train_labels, eval_texts, n_classes, ...)``:
  predictions of a tf-idf unigram+bigram multinomial logistic regression, the
  baseline an experiment reports beside the Transformer.
* :func:`logistic_regression` ``(x_train, train_labels, x_eval, n_classes, ...)``: the same
  model on any feature rows (dense or sparse), e.g. a linear probe on frozen features.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

_WORD = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own


def classification_metrics(
  pred: np.ndarray, labels: np.ndarray, n_classes: int
) -> dict[str, float]:
  """Accuracy and macro-F1 of predicted classes; examples labelled -1 are ignored.

  Args:
    pred: ``int[N]`` predicted classes in ``[0, n_classes)``.
    labels: ``int[N]`` true classes in ``[0, n_classes)``, or -1 (padding).
    n_classes: the number of classes.

  Returns:
    ``{"accuracy", "macro_f1"}`` as Python floats. Macro-F1 is the unweighted
    mean of per-class ``F1 = 2 tp / (2 tp + fp + fn)`` over the classes that
    occur among the labels or the predictions; a class with neither is
    excluded, as in sklearn's ``f1_score(average="macro")`` without ``labels=``
    (a class with labels but no correct prediction counts with F1 = 0, as
    sklearn's default ``zero_division`` does).

  Raises:
    ValueError: shapes differ, a value is out of range, or no label is >= 0.
  """
  pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
  if pred.shape != labels.shape:
    raise ValueError(f"pred has {pred.size} entries but labels has {labels.size}")
  keep = labels >= 0
  pred, labels = pred[keep].astype(np.int64), labels[keep].astype(np.int64)
  if not labels.size:
    raise ValueError("no labelled examples (every label is -1)")
  for name, v in (("pred", pred), ("labels", labels)):
    if v.min() < 0 or v.max() >= n_classes:
      raise ValueError(f"{name} values must be in [0, {n_classes}), got [{v.min()}, {v.max()}]")
  tp = np.bincount(labels[pred == labels], minlength=n_classes)
  n_pred = np.bincount(pred, minlength=n_classes)  # tp + fp
  n_true = np.bincount(labels, minlength=n_classes)  # tp + fn
  present = (n_pred + n_true) > 0
  f1 = 2 * tp[present] / (n_pred + n_true)[present]
  return {"accuracy": float(np.mean(pred == labels)), "macro_f1": float(np.mean(f1))}


def _ngrams(texts: Sequence[str], tokenizer) -> list[list]:
  """Unigrams and bigrams of each text: lower-cased words, or the tokenizer's ids."""
  if tokenizer is None:
    units = [_WORD.findall(t.lower()) for t in texts]
  else:
    units = tokenizer.encode_batch(list(texts))
  return [list(u) + list(itertools.pairwise(u)) for u in units]


def _features(
  grams: list[list], vocab: dict, idf: np.ndarray | None = None
) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
  """L2-normalised sublinear tf-idf rows ``float64[N, V]`` (CSR), and the idf used.

  Grams outside ``vocab`` are ignored; ``idf`` None computes the smoothed idf
  ``log((1 + N) / (1 + df)) + 1`` from these rows (the training set).
  """
  rows, cols = [], []
  for i, g in enumerate(grams):
    ids = [vocab[x] for x in g if x in vocab]
    rows += [i] * len(ids)
    cols += ids
  counts = scipy.sparse.csr_matrix(
    (np.ones(len(rows)), (rows, cols)), shape=(len(grams), len(vocab))
  )  # duplicates are summed
  counts.data = 1.0 + np.log(counts.data)  # sublinear tf: a repeated word counts less
  if idf is None:
    df = np.bincount(counts.indices, minlength=len(vocab))
    idf = np.log((1.0 + len(grams)) / (1.0 + df)) + 1.0
  x = counts.multiply(idf[None, :]).tocsr()
  norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).reshape(-1)
  x = scipy.sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ x
  return x.tocsr(), idf


def bow_logistic_regression(
  train_texts: Sequence[str],
  train_labels: np.ndarray,
  eval_texts: Sequence[str],
  n_classes: int,
  *,
  tokenizer=None,
  l2: float = 1e-4,
  steps: int = 1000,
) -> np.ndarray:
  """Predicts ``eval_texts``' classes with a bag-of-words logistic regression.

  Features: unigrams and bigrams of lower-cased words (``\\w+`` runs and single
  punctuation marks), or of the tokenizer's ids when ``tokenizer`` is given;
  the vocabulary is every n-gram of the training texts; values are sublinear
  tf-idf (``1 + log count`` times the smoothed training idf), each row
  L2-normalised. The model is :func:`logistic_regression` on those rows.

  Args:
    train_texts: ``N`` texts.
    train_labels: ``int[N]`` classes in ``[0, n_classes)``.
    eval_texts: ``M`` texts to classify.
    n_classes: the number of classes.
    tokenizer: optional; anything with ``encode_batch(texts) -> list[list[int]]``.
    l2: weight decay on ``W``, > 0.
    steps: the most L-BFGS iterations.

  Returns:
    ``np.int32[M]`` predicted classes (ties go to the lower class).
  """
  y = np.asarray(train_labels, np.int64).reshape(-1)
  if len(train_texts) != y.size or not y.size:
    raise ValueError(f"{len(train_texts)} train texts but {y.size} train labels")
  train_grams = _ngrams(train_texts, tokenizer)
  vocab = {}
  for g in train_grams:
    for x in g:
      vocab.setdefault(x, len(vocab))
  x_train, idf = _features(train_grams, vocab)
  x_eval, _ = _features(_ngrams(eval_texts, tokenizer), vocab, idf)
  return logistic_regression(x_train, y, x_eval, n_classes, l2=l2, steps=steps)


def logistic_regression(
  x_train, train_labels: np.ndarray, x_eval, n_classes: int, *, l2: float = 1e-4, steps: int = 1000
) -> np.ndarray:
  """Fits a multinomial logistic regression on feature rows and predicts others.

  Minimises the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (bias not
  penalised) with full-batch L-BFGS from zeros: deterministic, and the problem
  being strictly convex, it converges to the unique optimum.

  Args:
    x_train: ``float[N, V]`` training features, a NumPy array or SciPy sparse matrix.
    train_labels: ``int[N]`` classes in ``[0, n_classes)``.
    x_eval: ``float[M, V]`` features to classify (same kind and width).
    n_classes: the number of classes.
    l2: weight decay on ``W``, > 0.
    steps: the most L-BFGS iterations.

  Returns:
    ``np.int32[M]`` predicted classes (ties go to the lower class).
  """
  y = np.asarray(train_labels, np.int64).reshape(-1)
  if x_train.shape[0] != y.size or not y.size:
    raise ValueError(f"{x_train.shape[0]} feature rows but {y.size} train labels")
  if y.min() < 0 or y.max() >= n_classes:
    raise ValueError(f"train labels must be in [0, {n_classes}), got [{y.min()}, {y.max()}]")
  if l2 <= 0:
    raise ValueError(f"l2={l2} must be > 0")
  n, v = x_train.shape
  onehot = np.eye(n_classes)[y]  # (N, C)

  def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
    w, b = theta[: v * n_classes].reshape(v, n_classes), theta[v * n_classes :]
    logits = x_train @ w + b  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    log_p = logits - log_z
    loss = -np.sum(onehot * log_p) / n + 0.5 * l2 * np.sum(w * w)
    d_logits = (np.exp(log_p) - onehot) / n  # (N, C)
    grad_w = x_train.T @ d_logits + l2 * w
    return loss, np.concatenate([grad_w.reshape(-1), d_logits.sum(axis=0)])

  result = scipy.optimize.minimize(
    loss_and_grad,
    np.zeros(v * n_classes + n_classes),
    jac=True,
    method="L-BFGS-B",
    options={"maxiter": steps, "gtol": 1e-8, "ftol": 1e-12},
  )
  w = result.x[: v * n_classes].reshape(v, n_classes)
  b = result.x[v * n_classes :]
  return np.argmax(x_eval @ w + b, axis=1).astype(np.int32)
