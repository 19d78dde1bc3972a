"""Loading a trained run for generation and evaluation.

A run directory holds everything needed: ``config.json``, ``tokenizer.json``
and orbax checkpoints. :func:`load_run` restores the latest checkpoint onto
the run's mesh; :func:`evaluate_run` computes the exact validation loss.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax

from llm_mp import checkpoint, data, sharding
from llm_mp.config import Config
from llm_mp.models import TransformerLM
from llm_mp.optim import make_optimizer
from llm_mp.precision import Precision, make_precision
from llm_mp.step import make_eval_step
from llm_mp.train import evaluate, stored_config


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its config, policy, model, restored params and tokenizer."""

  config: Config
  precision: Precision
  model: TransformerLM
  params: Any
  tokenizer: data.Tokenizer
  mesh: Any
  rules: Any
  shardings: Any
  step: int


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
  precision = make_precision(config.train.precision, loss_scale=config.train.loss_scale)
  model = TransformerLM(config.model, precision)
  tx, _ = make_optimizer(config.optim, config.train.steps)
  abstract = sharding.abstract_train_state(model, tx, precision, config, mesh,
                                           jax.random.key(config.train.seed))
  restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"), abstract)
  if restored is None:
    raise ValueError(f"{workdir} has no checkpoint yet: train first")
  state, _, step = restored
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  return LoadedRun(config, precision, model, state.params, tokenizer, mesh,
                   sharding.logical_rules(config.mesh), shardings, step)


def evaluate_run(workdir: str, paths: Sequence[str] | None = None) -> dict[str, Any]:
  """Validation loss/perplexity of the run's latest checkpoint.

  Args:
    workdir: a run directory.
    paths: text files to evaluate on instead of the run's validation split
      (then every document of them counts, tokenised with the run's tokenizer).

  Returns:
    ``{"step", "val_loss", "val_ppl", "val_tokens"}``.
  """
  run = load_run(workdir)
  cfg = run.config.data
  if paths:  # all of the given text counts: no validation split is held out of it
    cfg = dataclasses.replace(cfg, paths=tuple(paths), val_fraction=0.0)
  # write=False: an evaluator never writes into the run (it may be read-only or training).
  prepared = data.prepare_data(cfg, workdir, tokenizer=run.tokenizer, write=False)
  splits = [prepared.train] if paths else [prepared.val]
  eval_fn = sharding.jit_eval_step(make_eval_step(run.model), run.shardings, run.mesh, run.rules)
  batch = run.config.train.batch_size
  totals = {"loss_sum": 0.0, "tokens": 0.0}
  for split in splits:
    batches = data.make_eval_iterator(dataclasses.replace(prepared, val=split), batch)
    r = evaluate(eval_fn, run.params, batches, run.mesh, run.rules)
    totals["loss_sum"] += r["val_loss"] * r["val_tokens"]
    totals["tokens"] += r["val_tokens"]
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {"step": run.step, "val_loss": loss, "val_ppl": float(jax.numpy.exp(loss)),
          "val_tokens": totals["tokens"]}
