"""Post-training weight-only quantisation of a trained run (``llm-mp quantize``).

:func:`quantize_run` reads a run's newest parameters and writes a new run
directory whose config sets ``precision.formats`` to ``int8-weight`` or
``int4-weight`` (``llm_mp.formats.int8``): every kernel that format reaches
(the run's ``precision.format_edges`` decides whether the first and last
block and the heads do; by default they keep their float weights) is stored
as integers ``<name>_q`` and scales ``<name>_scale``, in a params-only
checkpoint that ``llm-mp eval`` and ``llm-mp generate`` restore like any
other. The tokenizer and the token cache come along.

Which parameters to convert is the quantised model's to say: its abstract
parameters (``jax.eval_shape`` of its init) name them, and an ``apply`` of
that model on the float parameters, with ``params`` mutable, quantises each
float kernel where the model asks for its integers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from llm_mp import inference
from llm_mp.builder import build_recipe, check_patterns
from llm_mp.config import Config
from llm_mp.formats import stored_bytes, weight_only_formats
from llm_mp.models import FAMILIES
from llm_mp.rundir import abstract_run_state, check_new_directory, load_run, publish_run

TARGETS = {"int8": "int8-weight", "int4": "int4-weight"}  # --to -> precision.formats


def quantized_config(config: Config, to: str) -> Config:
  """``config`` with every matmul the formats reach in ``TARGETS[to]``."""
  if to not in TARGETS:
    raise ValueError(f"--to {to!r}: valid: {sorted(TARGETS)}")
  return dataclasses.replace(
    config, precision=dataclasses.replace(config.precision, formats=TARGETS[to])
  )


def quantize_params(model: nn.Module, config: Config, params: Any, abstract: Any) -> Any:
  """The parameters of the weight-only ``model`` from a float run's ``params``.

  Args:
    model: the quantised model (of ``config``, whose formats are weight-only).
    config: its config (the family's example inputs drive the ``apply``).
    params: the float run's parameters.
    abstract: the quantised model's parameters as ``jax.ShapeDtypeStruct`` with
      shardings (:func:`llm_mp.builder.abstract_run_params`).

  Returns:
    A tree shaped like ``abstract``, placed on its shardings: the float
    parameters where the model keeps them, ``<name>_q`` / ``<name>_scale``
    quantised from the float ``<name>`` where it asks for integers.
  """
  args = FAMILIES[config.model.family].example_inputs(config.data.seq_len)
  wanted = traverse_util.flatten_dict(abstract)

  def convert(params):
    # flax hands each new parameter's initialiser a key; these ignore it (they quantise).
    rngs = {"params": jax.random.key(0)}
    _, variables = model.apply({"params": params}, *args, rngs=rngs, mutable=["params"])
    flat = traverse_util.flatten_dict(nn.unbox(variables["params"]))
    return traverse_util.unflatten_dict({k: flat[k] for k in wanted})

  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(convert, out_shardings=shardings)(params)


def _directory_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def _link_or_copy(src: str, dst: str) -> None:
  # Token files are written once and replaced, never changed in place: a hard link is safe.
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _sizes(float_params: Any, params: Any) -> dict[str, Any]:
  """Bytes of the converted kernels before (float) and after (integers + scales)."""
  before, after = traverse_util.flatten_dict(float_params), traverse_util.flatten_dict(params)
  names = [k[:-1] + (k[-1][: -len("_q")],) for k in after if k[-1].endswith("_q")]
  float_bytes = stored_bytes([before[k] for k in names])
  int_bytes = stored_bytes(
    [after[k[:-1] + (k[-1] + suffix,)] for k in names for suffix in ("_q", "_scale")]
  )
  return {
    "tensors": len(names),
    "float_bytes": float_bytes,
    "quantized_bytes": int_bytes,
    "ratio": round(float_bytes / max(int_bytes, 1), 3),
    "params_bytes_before": stored_bytes(float_params),
    "params_bytes_after": stored_bytes(params),
  }


def quantize_run(
  workdir: str, to: str, out: str | None = None, evaluate: bool = False
) -> dict[str, Any]:
  """Writes the weight-only quantised copy of run ``workdir``.

  Args:
    workdir: a trained run directory.
    to: ``"int8"`` or ``"int4"``.
    out: the new run directory (default ``<workdir>-<to>``); it must not exist
      or be empty.
    evaluate: also evaluate both runs on the validation split
      (:func:`llm_mp.inference.evaluate_run`).

  Returns:
    ``{"out", "format", "step", "source_step", "sizes": {...}, "checkpoint_bytes"}``
    (the absolute new run directory, its checkpoint's step, the step of the
    parameters it was made from, bytes of its ``checkpoints/`` directory), plus ``"eval_before"`` /
    ``"eval_after"`` with ``evaluate``.

  Raises:
    ValueError: an unknown ``to``, a run already in a weight-only format, a model
      with no matmul the format reaches (``precision.format_edges``), or an
      ``out`` that exists and is not empty.
  """
  out = out or f"{os.path.abspath(workdir).rstrip(os.sep)}-{to}"
  check_new_directory(out)
  run = load_run(workdir)
  stored = {fmt for _, fmt in run.precision.formats} & set(weight_only_formats())
  if stored:
    raise ValueError(f"{workdir} is already quantised (precision.formats={sorted(stored)})")
  config = quantized_config(run.config, to)
  check_patterns(config)  # a format that reaches no matmul is an error
  model = build_recipe(config, run.tokenizer).model
  params = quantize_params(
    model, config, run.params, abstract_run_state(config, run.mesh, run.tokenizer).params
  )

  def copy_token_cache(tmp: str) -> None:  # eval needs no re-tokenising
    if os.path.isdir(os.path.join(workdir, "data")):
      shutil.copytree(
        os.path.join(workdir, "data"), os.path.join(tmp, "data"), copy_function=_link_or_copy
      )

  publish_run(out, config, run.tokenizer, run.step, {"params": params}, copy_token_cache)
  report = {
    "out": out,
    "format": TARGETS[to],
    "step": run.step,
    "source_step": run.step,
    "sizes": _sizes(run.params, params),
    "checkpoint_bytes": _directory_bytes(os.path.join(out, "checkpoints")),
  }
  if evaluate:
    report["eval_before"] = inference.evaluate_run(workdir)
    report["eval_after"] = inference.evaluate_run(out)
  return report
