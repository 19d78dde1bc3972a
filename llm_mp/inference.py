"""Evaluating and predicting with a model: the exact validation loop (used by
training and by ``llm-mp eval``), and a loaded run's evaluation and predictions.

What data a task evaluates on and what it predicts comes from its registry
entry (``llm_mp.tasks``); the run is loaded by ``llm_mp.rundir.load_run`` with
its parameters and non-parameter collections, so :func:`evaluate_run` of a
checkpoint equals the evaluation inside training at that step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax

from llm_mp import sharding
from llm_mp.rundir import LoadedRun, load_run
from llm_mp.step import make_eval_step
from llm_mp.tasks import Task, task_spec

_EVAL_SYNC = 32  # evaluation batches dispatched between two reads of their results


def evaluate(
  eval_fn, variables: Any, batches: Iterable[dict], mesh, rules, task: Task
) -> dict[str, float]:
  """Exact means of the task loss and metrics of ``variables`` over ``batches``.

  Args:
    eval_fn: ``(variables, batch) -> sums`` (``llm_mp.step.make_eval_step``, jitted).
    variables: ``{"params": ..., **collections}``.
    batches: NumPy batches of the task's keys.
    mesh, rules: where the batches are placed (``task.batch_axes``).
    task: the run's task.

  Returns:
    ``val_loss``, ``val_<unit>`` (tokens or examples counted), ``val_ppl`` for
    token-level tasks and ``val_<metric>`` for task metrics (``val_accuracy``).
  """
  sums: dict[str, float] = {}

  def add(outs: list[dict]) -> None:  # float64, in batch order
    for out in jax.device_get(outs):
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)

  # Results are read every _EVAL_SYNC batches, not after each one, so the device runs
  # ahead of the host while a bounded number of batches is in flight.
  pending = []
  for batch in batches:
    pending.append(eval_fn(variables, sharding.shard_batch(batch, mesh, rules, task.batch_axes)))
    if len(pending) == _EVAL_SYNC:
      add(pending)
      pending = []
  add(pending)
  n = max(sums.get(task.unit, 0.0), 1.0)
  loss = sums.get("loss_sum", 0.0) / n
  result = {"val_loss": loss, f"val_{task.unit}": sums.get(task.unit, 0.0)}
  if task.perplexity:
    result["val_ppl"] = math.exp(min(loss, 50.0))
  for k, v in sums.items():
    if k.endswith("_sum") and k != "loss_sum":
      result[f"val_{k[:-4]}"] = v / n
  return result


def evaluate_run(workdir: str, paths: Sequence[str] | None = None) -> dict[str, Any]:
  """Validation loss (and perplexity or accuracy) of the run's latest checkpoint.

  Args:
    workdir: a run directory.
    paths: files to evaluate on instead of the run's validation data (a
      corpus: every document of them counts; labelled or pair files: they
      replace the validation files), read with the run's tokenizer.

  Returns:
    ``{"step", "val_loss", "val_<unit>", ...}``: ``val_ppl`` for token-level
    tasks, task metrics such as ``val_accuracy``.
  """
  return evaluate_loaded(load_run(workdir), paths)


def evaluate_loaded(run: LoadedRun, paths: Sequence[str] | None = None) -> dict[str, Any]:
  """:func:`evaluate_run` of a loaded run (or a changed one: a low-rank
  conversion's recipe and params). Its tokenised data may be cached in the run
  directory; nothing is written."""
  spec = task_spec(run.config)
  config, split = (run.config, "val") if not paths else spec.data.on_files(run.config, paths)
  prepared = spec.data.prepare(config, run.workdir, run.tokenizer, write=False)
  batches = spec.data.eval_batches(prepared, config, None, split)
  task = run.recipe.task
  eval_fn = jax.jit(sharding.with_rules(make_eval_step(run.model, task), run.mesh, run.rules))
  return {
    "step": run.step,
    **evaluate(eval_fn, run.variables, batches, run.mesh, run.rules, task),
  }


def predict_run(workdir: str, texts: Sequence[str], **options) -> list[str]:
  """The text-level predictions of run ``workdir``'s task for ``texts``: a
  continuation (lm), a reconstruction (mlm), a label (classify), an output text
  (seq2seq); ``options`` go to the task's ``predict``."""
  run = load_run(workdir)
  return task_spec(run.config).predict(run, list(texts), **options)
