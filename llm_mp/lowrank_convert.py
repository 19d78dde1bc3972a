"""Converting a trained dense run to a low-rank one, and what each rank costs in perplexity.

:func:`convert_run` (``llm-mp lowrank --workdir RUN --rank R``) writes a new
run directory whose config names ``precision.formats=lowrank:R`` (so the
matmuls that format reaches by default: not the first and last block, not
the heads) and whose step-0 checkpoint holds the truncated-SVD factors of the
dense kernels (``llm_mp.formats.lowrank.factorize``); ``llm-mp eval`` / ``generate``
load it like any run, and ``llm-mp train`` fine-tunes it. :func:`svd_sweep`
measures the validation perplexity of the run and of its conversion at each
rank, in memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax

from llm_mp.builder import build_recipe
from llm_mp.config import Config
from llm_mp.formats.lowrank import factorize, parse_rank
from llm_mp.inference import evaluate_loaded
from llm_mp.rundir import LoadedRun, load_run, write_run
from llm_mp.state import abstract_train_state, param_count


def lowrank_config(config: Config, rank: int) -> Config:
  """``config`` with ``precision.formats=lowrank:rank`` (every matmul but the first and last
  block's and the heads'). ValueError naming ``--rank`` unless it is a positive integer."""
  parse_rank(str(rank), "--rank")
  precision = dataclasses.replace(config.precision, formats=f"lowrank:{rank}", format_edges=False)
  return dataclasses.replace(config, precision=precision)


def to_lowrank(run: LoadedRun, rank: int) -> tuple[LoadedRun, list[str]]:
  """``run`` converted to rank ``rank``: its low-rank config and recipe, and the factors
  of its kernels placed on its mesh; with the paths of the kernels factorised."""
  config = lowrank_config(run.config, rank)
  recipe = build_recipe(config, run.tokenizer)
  abstract = abstract_train_state(
    recipe.model, recipe.tx, config, run.mesh, jax.random.key(0)
  ).params
  params, factorised = factorize(jax.device_get(run.params), abstract)
  params = jax.tree.map(lambda a, x: jax.device_put(x, a.sharding), abstract, params)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  low = dataclasses.replace(run, config=config, recipe=recipe, params=params, shardings=shardings)
  return low, factorised


def convert_run(workdir: str, rank: int, out: str | None = None) -> dict[str, Any]:
  """Writes the truncated-SVD conversion of run ``workdir``'s latest parameters.

  Args:
    workdir: a trained run directory.
    rank: ``R`` of ``lowrank:R``.
    out: the new run directory (default ``<workdir>-lowrank<R>``); it must not
      exist or be empty.

  Returns:
    ``{"out", "rank", "params_before", "params_after", "factorised"}`` (the
    total parameter counts and the number of dense kernels factorised).

  Raises:
    ValueError: a bad rank, no run or checkpoint at ``workdir``, ``out`` not
      empty, or a run already in another low-rank format.
  """
  parse_rank(str(rank), "--rank")
  out = out or f"{os.path.abspath(workdir).rstrip(os.sep)}-lowrank{rank}"
  run = load_run(workdir)
  low, factorised = to_lowrank(run, rank)
  write_run(out, low.config, low.params, low.tokenizer)
  return {
    "out": out,
    "rank": rank,
    "params_before": param_count(run.params),
    "params_after": param_count(low.params),
    "factorised": len(factorised),
  }


def svd_sweep(workdir: str, ranks: Sequence[int]) -> list[dict[str, Any]]:
  """Validation loss and perplexity of run ``workdir`` (a language model) and of its
  truncated-SVD conversion at each rank (nothing is written).

  Returns:
    One row per model, the dense run first (``rank`` None):
    ``{"rank", "params", "val_loss", "perplexity"}``.
  """
  run = load_run(workdir)

  def row(rank: int | None, model: LoadedRun) -> dict[str, Any]:
    result = evaluate_loaded(model)
    return {
      "rank": rank,
      "params": param_count(model.params),
      "val_loss": result["val_loss"],
      "perplexity": result["val_ppl"],
    }

  return [row(None, run)] + [row(rank, to_lowrank(run, rank)[0]) for rank in ranks]
