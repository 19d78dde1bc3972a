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

from llm_mp.builder import build_recipe, check_patterns
from llm_mp.config import Config
from llm_mp.formats.lowrank import factorize, parse_rank, rank_limits
from llm_mp.inference import evaluate_loaded, evaluate_run
from llm_mp.rundir import LoadedRun, check_new_directory, load_run, write_run
from llm_mp.state import abstract_train_state, param_count


def lowrank_config(config: Config, rank: int) -> Config:
  """``config`` with ``precision.formats=lowrank:rank`` (every matmul but the first and last
  block's and the heads'). ValueError naming ``--rank`` unless it is a positive integer."""
  parse_rank(str(rank), "--rank")
  precision = dataclasses.replace(config.precision, formats=f"lowrank:{rank}", format_edges=False)
  return dataclasses.replace(config, precision=precision)


def to_lowrank(run: LoadedRun, rank: int, strict: bool = False) -> tuple[LoadedRun, list[str]]:
  """``run`` converted to rank ``rank``: its low-rank config and recipe, and the factors
  of its kernels placed on its mesh; with the paths of the kernels factorised.

  Past ``min(K, N)`` of a ``[K, N]`` kernel its factors are padded with zeros
  (exactly the kernel, in more parameters); ``strict`` refuses such a rank.

  Raises:
    ValueError: no matmul to factorise (every block is a first or last one), or
      with ``strict`` a rank at or above ``min(K, N)`` of a kernel.
  """
  config = lowrank_config(run.config, rank)
  check_patterns(config)
  recipe = build_recipe(config, run.tokenizer)
  abstract = abstract_train_state(
    recipe.model, recipe.tx, config, run.mesh, jax.random.key(0)
  ).params
  dense = jax.device_get(run.params)
  limits = rank_limits(dense, abstract)
  over = sorted((limit, path) for path, limit in limits.items() if rank >= limit)
  if strict and over:
    raise ValueError(
      f"--rank {rank} is at or above min(K, N) of {len(over)} of the {len(limits)} "
      f"kernels to factorise (of {over[0][1]}: {over[0][0]}), whose factors would then "
      f"hold more than the kernel; use a rank below {min(limits.values())}"
    )
  params, factorised = factorize(dense, abstract)
  params = jax.tree.map(lambda a, x: jax.device_put(x, a.sharding), abstract, params)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  low = dataclasses.replace(run, config=config, recipe=recipe, params=params, shardings=shardings)
  return low, factorised


def convert_run(
  workdir: str, rank: int, out: str | None = None, evaluate: bool = False
) -> dict[str, Any]:
  """Writes the truncated-SVD conversion of run ``workdir``'s latest parameters.

  Args:
    workdir: a trained run directory.
    rank: ``R`` of ``lowrank:R``.
    out: the new run directory (default ``<workdir>-lowrank<R>``); it must not
      exist or be empty.
    evaluate: also evaluate both runs on the validation split
      (:func:`llm_mp.inference.evaluate_run`).

  Returns:
    ``{"out", "format", "step", "source_step", "rank", "params_before",
    "params_after", "factorised"}`` (the absolute new run directory, its
    checkpoint's step (0: ``llm-mp train`` fine-tunes it from there), the step of the
    parameters it was made from, the total parameter
    counts and the number of dense kernels factorised), plus ``"eval_before"`` /
    ``"eval_after"`` with ``evaluate``: the keys ``llm-mp quantize`` reports.

  Raises:
    ValueError: a bad rank (also one at or above ``min(K, N)`` of a ``[K, N]``
      kernel: its factors would hold more than the kernel), no matmul to factorise,
      no run or checkpoint at ``workdir``, ``out`` not empty, or a run already in
      another low-rank format.
  """
  parse_rank(str(rank), "--rank")
  out = out or f"{os.path.abspath(workdir).rstrip(os.sep)}-lowrank{rank}"
  check_new_directory(out)
  run = load_run(workdir)
  low, factorised = to_lowrank(run, rank, strict=True)
  write_run(out, low.config, low.params, low.tokenizer)
  report = {
    "out": out,
    "format": low.config.precision.formats,
    "step": 0,
    "source_step": run.step,
    "rank": rank,
    "params_before": param_count(run.params),
    "params_after": param_count(low.params),
    "factorised": len(factorised),
  }
  if evaluate:
    report["eval_before"] = evaluate_run(workdir)
    report["eval_after"] = evaluate_run(out)
  return report


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
