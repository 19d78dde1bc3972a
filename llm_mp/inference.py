"""Loading a trained run for generation and evaluation.

A run directory holds everything needed: ``config.json``, ``tokenizer.json``
and orbax checkpoints. :func:`load_run` restores the latest checkpoint onto
the run's mesh; :func:`evaluate_run` computes the exact validation loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from llm_mp import data, sharding
from llm_mp.builder import Recipe, build_recipe, restore_run_params
from llm_mp.config import Config
from llm_mp.data import text2text
from llm_mp.precision import Precision
from llm_mp.step import make_eval_step
from llm_mp.train import evaluate, stored_config


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its config, recipe (policy, task, model), restored params
  and tokenizer."""

  config: Config
  recipe: Recipe
  params: Any
  tokenizer: data.Tokenizer
  mesh: Any
  rules: Any
  shardings: Any
  step: int

  @property
  def precision(self) -> Precision:
    return self.recipe.precision

  @property
  def model(self):
    return self.recipe.model


def load_run(workdir: str) -> LoadedRun:
  """Restores the latest checkpoint of ``workdir``.

  Raises:
    ValueError: ``workdir`` is not a run directory or has no checkpoint yet.
  """
  config = stored_config(workdir)
  if config is None:
    raise ValueError(f"{workdir} has no config.json: not a run directory (train first)")
  tokenizer = data.load_tokenizer(workdir)
  mesh = sharding.make_mesh(config.mesh)
  recipe = build_recipe(config, tokenizer)
  params, step = restore_run_params(workdir, config, mesh, tokenizer)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return LoadedRun(
    config, recipe, params, tokenizer, mesh, sharding.logical_rules(config.mesh), shardings, step
  )


def evaluate_run(workdir: str, paths: Sequence[str] | None = None) -> dict[str, Any]:
  """Validation loss/perplexity of the run's latest checkpoint.

  Args:
    workdir: a run directory.
    paths: text files to evaluate on instead of the run's validation split
      (then every document of them counts, tokenised with the run's tokenizer).

  Returns:
    ``{"step", "val_loss", "val_ppl", "val_tokens"}``; for a classification
    run ``{"step", "val_loss", "val_accuracy", "val_examples"}`` on its
    validation files (or ``paths``).
  """
  return evaluate_loaded(load_run(workdir), workdir, paths)


def evaluate_loaded(
  run: LoadedRun, workdir: str, paths: Sequence[str] | None = None
) -> dict[str, Any]:
  """:func:`evaluate_run` of a loaded run.

  Args:
    run: as :func:`load_run` returns it, or changed (another recipe and
      params: a low-rank conversion).
    workdir: the run directory its tokenised data may be cached in (read
      only, nothing is written).
    paths: as for :func:`evaluate_run`.
  """
  cfg = run.config.data
  task = run.recipe.task
  eval_fn = jax.jit(sharding.with_rules(make_eval_step(run.model, task), run.mesh, run.rules))
  batch = run.config.train.batch_size
  if task.name == "seq2seq":  # text-to-text pairs: ``paths`` replace the validation pairs
    if paths:
      cfg = dataclasses.replace(cfg, val_paths=tuple(paths))
    prepared = text2text.prepare_text2text(cfg, workdir, tokenizer=run.tokenizer, write=False)
    batches = data.ordered_batches(prepared.val, batch)
    return {
      "step": run.step,
      **evaluate(eval_fn, {"params": run.params}, batches, run.mesh, run.rules, task),
    }
  if task.name == "classify":  # labelled files: ``paths`` replace the validation files
    if paths:
      cfg = dataclasses.replace(cfg, val_paths=tuple(paths))
    prepared = data.prepare_labelled(cfg, workdir, tokenizer=run.tokenizer, write=False)
    batches = data.ordered_batches(prepared.val, batch)
    return {
      "step": run.step,
      **evaluate(eval_fn, {"params": run.params}, batches, run.mesh, run.rules, task),
    }
  if paths:  # all of the given text counts: no validation split is held out of it
    cfg = dataclasses.replace(cfg, paths=tuple(paths), val_fraction=0.0)
  # write=False: an evaluator never writes into the run (it may be read-only or training).
  prepared = data.prepare_data(cfg, workdir, tokenizer=run.tokenizer, write=False)
  splits = [prepared.train] if paths else [prepared.val]
  totals = {"loss_sum": 0.0, "tokens": 0.0}
  for split in splits:
    batches = data.make_eval_iterator(dataclasses.replace(prepared, val=split), batch)
    r = evaluate(eval_fn, {"params": run.params}, batches, run.mesh, run.rules, task)
    totals["loss_sum"] += r["val_loss"] * r["val_tokens"]
    totals["tokens"] += r["val_tokens"]
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {
    "step": run.step,
    "val_loss": loss,
    "val_ppl": float(jax.numpy.exp(loss)),
    "val_tokens": totals["tokens"],
  }
