"""The matmul formats by name, and the one matmul every weight goes through.

The precision policy (``precision.formats``) names a format per module path;
every weight matmul of the models (Dense layers: attention projections, MLPs,
heads; the MoE experts) asks for it through :func:`matmul`, so a format
reaches exactly the matmuls its pattern names. Formats:

* ``none``: the weight in the policy's param dtype, the matmul in its compute
  dtype (everything above 16 bits; ``llm_mp.formats.base``).
* ``fp8``: input and weight in float8 e4m3, the product's gradient in e5m2,
  per-tensor scales, delayed or current (``llm_mp.formats.fp8``).
* ``int8``: int8 quantisation-aware training (``llm_mp.formats.int8``).
* ``int8-weight``, ``int4-weight``: weight-only integer storage for generation
  and evaluation, written by ``llm-mp quantize`` (``llm_mp.formats.int8``).
* ``lowrank:R``: the weight as two rank-``R`` factors, ``(x @ U) @ V``
  (``llm_mp.formats.lowrank``).

Each is a :class:`~llm_mp.formats.base.Format` entry of :data:`FORMATS`, which
owns everything about it: its matmul, its argument, its state collection and
the options it reads. Callers ask this module (:func:`state_collections`,
:func:`weight_only_formats`) and never a format's name; a new format is one
module and one :func:`register_format` line.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import PrecisionConfig
from llm_mp.formats import fp8, int8, lowrank
from llm_mp.formats.base import PLAIN, Format, Weight
from llm_mp.precision import module_path

FORMATS: dict[str, Format] = {}
_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(PrecisionConfig))
# While :func:`traced_matmuls` is open a model: module path -> format of each weight matmul.
_TRACED: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
  "llm_mp_traced_matmuls", default=None
)


def register_format(entry: Format) -> Format:
  """Adds ``entry`` to :data:`FORMATS` under its name and returns it.

  Raises:
    ValueError: the name is taken, or an option is not a ``PrecisionConfig`` field.
  """
  if entry.name in FORMATS:
    raise ValueError(f"matmul format {entry.name!r} is already registered")
  unknown = sorted(set(entry.options) - _OPTION_FIELDS)
  if unknown:
    raise ValueError(f"matmul format {entry.name!r} reads unknown precision options {unknown}")
  FORMATS[entry.name] = entry
  return entry


register_format(PLAIN)
register_format(fp8.FP8)
register_format(int8.INT8_QAT)
register_format(int8.INT8_WEIGHT)
register_format(int8.INT4_WEIGHT)
register_format(lowrank.LOWRANK)


def parse_format(spec: str, field: str = "precision.formats") -> tuple[str, str | None]:
  """``"lowrank:64"`` -> ``("lowrank", "64")``; ValueError naming ``field`` for an unknown
  name or a bad argument."""
  name, _, arg = str(spec).strip().lower().partition(":")
  if name not in FORMATS:
    raise ValueError(f"unknown matmul format {spec!r} in {field}; valid: {sorted(FORMATS)}")
  if FORMATS[name].parse_arg is not None:
    FORMATS[name].parse_arg(arg or None, field)
  return name, arg or None


def parse_formats(text: str, field: str = "precision.formats") -> tuple[tuple[str, str], ...]:
  """``"fp8"`` or ``"*mlp*=int8;lm_head=lowrank:64"`` -> ``(pattern, format)`` pairs, the
  :attr:`~llm_mp.precision.Precision.formats` of a policy (a bare format applies to
  every module). ValueError naming ``field`` for an unknown format or a bad argument."""
  pairs = []
  for item in (text or "").split(";"):
    if not item.strip():
      continue
    pattern, _, fmt = item.rpartition("=")
    parse_format(fmt, field)
    pairs.append((pattern.strip() or "*", fmt.strip().lower()))
  return tuple(pairs)


def state_collections(overwrite: bool | None = None) -> tuple[str, ...]:
  """The flax collections the registered formats keep state in, sorted; with
  ``overwrite`` True (False) only those whose gradient is (is not) their new value."""
  return tuple(
    sorted(
      {
        f.collection
        for f in FORMATS.values()
        if f.collection and overwrite in (None, f.overwrite_with_gradient)
      }
    )
  )


def weight_only_formats() -> tuple[str, ...]:
  """Names of the formats that store weights no gradient reaches (not trainable), sorted."""
  return tuple(sorted(name for name, f in FORMATS.items() if f.weight_only))


def require_float_weights(precision: Any, workdir: str, command: str) -> None:
  """Raises ValueError (one line, naming ``command``) when the run ``workdir``'s policy
  ``precision`` (a :class:`~llm_mp.precision.Precision`) stores weights as something
  other than their float arrays (integers and scales, factors)."""
  specs = sorted({fmt for _, fmt in precision.formats})
  converted = [fmt for fmt in specs if not FORMATS[parse_format(fmt)[0]].float_weight]
  if converted:
    raise ValueError(
      f"{workdir} stores its matmul weights as precision.formats={','.join(converted)}, "
      f"not as float kernels; {command} reads float weights: run it on the run this one "
      "was converted from"
    )


@contextlib.contextmanager
def traced_matmuls() -> Iterator[dict[str, str]]:
  """Within it, every weight matmul traced (an ``init`` or ``apply``, abstract or not)
  records ``{module path: format spec}`` in the dict it yields (``"none"`` where the
  dtype policy alone applies)."""
  traced: dict[str, str] = {}
  token = _TRACED.set(traced)
  try:
    yield traced
  finally:
    _TRACED.reset(token)


def module_format(module: nn.Module) -> str:
  """The format the precision policy names for a bound module (``"none"`` if none)."""
  return module.precision.format_for(module_path(module))


def matmul(
  module: nn.Module,
  x: jax.Array,
  weight: Weight,
  *,
  bias: Callable[[], jax.Array] | None = None,
  activation: Callable[[jax.Array], jax.Array] | None = None,
  out_dtype: Any = None,
) -> jax.Array:
  """``activation((x @ W + bias).astype(out_dtype))`` for ``module``'s weight, in the
  format its path resolves to.

  Args:
    module: the bound flax module owning the weight (with a ``precision``).
    x: ``[*batch, ..., *in_shape]`` in the module's compute dtype.
    weight: the weight's description.
    bias: makes the ``[*out_shape]`` bias (in the compute dtype), or None; called
      after the weight is made, so parameters initialise weight first.
    activation: elementwise function applied last, or None.
    out_dtype: dtype of the result (default: ``x``'s).

  Returns:
    ``[*batch, ..., *out_shape]`` in ``out_dtype``.
  """
  spec = module_format(module)
  traced = _TRACED.get()
  if traced is not None:  # a trace-time record for traced_matmuls, no part of the computation
    traced[module_path(module)] = spec
  name, arg = parse_format(spec)
  entry = FORMATS[name]
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if entry.fused is not None and not weight.batch_shape:
    return entry.fused(module, x, weight, bias, activation, out_dtype)
  y = entry.matmul(module, x, weight, arg, module.precision.format_options)
  if bias is not None:
    y = y + bias()
  y = y.astype(out_dtype)
  return y if activation is None else activation(y)
