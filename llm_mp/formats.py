"""Matmul formats: how a layer stores its weight and computes ``x @ W``.

The precision policy (``precision.formats``) names a format per module path;
every weight matmul of the models (Dense layers: attention projections, MLPs,
heads; the MoE experts) asks for it through the one function :func:`matmul`,
so a format reaches exactly the matmuls its pattern names. Formats:

* ``none``: the weight in the policy's param dtype, the matmul in its compute
  dtype (everything above 16 bits).
* ``fp8``: input and weight in float8 e4m3, the product's gradient in e5m2,
  per-tensor scales, delayed or current (:mod:`llm_mp.fp8`).
* ``int8``: int8 quantisation-aware training (``llm_mp.int_formats``).
* ``int8-weight``, ``int4-weight``: weight-only integer storage for generation
  and evaluation, written by ``llm-mp quantize`` (``llm_mp.int_formats``).
* ``lowrank:R``: the weight as two rank-``R`` factors, ``(x @ U) @ V``
  (``llm_mp.lowrank``).

A format is a function registered in :data:`FORMATS` under its name::

  fn(module, x, weight, arg, options) -> y

``module`` is the bound flax module that owns the weight (the format creates
its parameters, and any state, with ``module.param`` / ``module.variable``),
``x`` the input in the compute dtype, ``weight`` a :class:`Weight`, ``arg``
what follows ``:`` in the format's name (``lowrank:64`` -> ``"64"``, else
``None``) and ``options`` the :class:`~llm_mp.precision.FormatOptions`. It
returns ``x @ W`` in the compute dtype, before bias and activation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp import int_formats
from llm_mp.fp8 import fp8_matmul
from llm_mp.lowrank import lowrank_matmul, parse_rank
from llm_mp.precision import module_path, module_policy


@dataclasses.dataclass(frozen=True)
class Weight:
  """What a format needs to create and contract one weight.

  Attributes:
    name: the parameter's name (``"kernel"``, ``"w_in"``); formats that store
      more than one array name them from it (``"kernel_u"``).
    batch_shape: leading axes shared with ``x`` and not contracted (the MoE's
      experts ``(E,)``); ``()`` for a plain layer.
    in_shape: the contracted axes (the last ``len(in_shape)`` axes of ``x``).
    out_shape: the output axes.
    axes: logical axis names of the full weight ``batch + in + out``.
    init_std: standard deviation of the normal initialiser.
  """

  name: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init_std: float
  batch_shape: tuple[int, ...] = ()

  @property
  def shape(self) -> tuple[int, ...]:
    return self.batch_shape + self.in_shape + self.out_shape


def contract(x: jax.Array, w: jax.Array, n_in: int, n_batch: int = 0) -> jax.Array:
  """``x [*batch, ..., *in] @ w [*batch, *in, *out] -> [*batch, ..., *out]`` in x's dtype.

  Without batch axes this is :func:`llm_mp.models.layers.dense` (its 2-D
  gradient formulation); with them a batched ``dot_general`` (the experts).
  """
  from llm_mp.models.layers import dense  # pylint: disable=import-outside-toplevel

  if n_batch == 0:
    return dense(x, w, n_in=n_in)
  x_contract = tuple(range(x.ndim - n_in, x.ndim))
  w_contract = tuple(range(n_batch, n_batch + n_in))
  batch = tuple(range(n_batch))
  return jax.lax.dot_general(x, w, ((x_contract, w_contract), (batch, batch)))


def weight_param(module: nn.Module, weight: Weight, name: str, shape, std: float) -> jax.Array:
  """A normal-initialised parameter of ``module`` in its policy's param dtype, cast to
  the compute dtype, with the logical axes of ``weight`` (``shape`` may differ from
  ``weight.shape`` in its last axes, e.g. a low-rank factor)."""
  policy = module_policy(module)
  init = nn.with_logical_partitioning(nn.initializers.normal(std), weight.axes)
  return policy.cast_to_compute(module.param(name, init, tuple(shape), policy.param_dtype))


def _plain(module, x, weight: Weight, arg, options) -> jax.Array:
  del arg, options
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  return contract(x, w, len(weight.in_shape), len(weight.batch_shape))


FORMATS: Mapping[str, Callable[..., jax.Array]] = {
  "none": _plain,
  "fp8": fp8_matmul,
  "int8": int_formats.int8_qat,
  "int8-weight": int_formats.int8_weight,
  "int4-weight": int_formats.int4_weight,
  "lowrank": lowrank_matmul,
}

# Parsers of the argument of the formats that take one (``lowrank:64``), called with the
# argument and the config field when the format is named; each raises ValueError
# naming the field and the value.
FORMAT_ARGS: Mapping[str, Callable[[str | None, str], Any]] = {
  "lowrank": parse_rank,
}


def parse_format(spec: str, field: str = "precision.formats") -> tuple[str, str | None]:
  """``"lowrank:64"`` -> ``("lowrank", "64")``; ValueError naming ``field`` for an unknown
  name or a bad argument."""
  name, _, arg = str(spec).strip().lower().partition(":")
  if name not in FORMATS:
    raise ValueError(f"unknown matmul format {spec!r} in {field}; valid: {sorted(FORMATS)}")
  if name in FORMAT_ARGS:
    FORMAT_ARGS[name](arg or None, field)
  return name, arg or None


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
  from llm_mp.models.layers import dense  # pylint: disable=import-outside-toplevel

  name, arg = parse_format(module_format(module))
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if name == "none" and not weight.batch_shape:
    # The plain layer keeps bias and activation inside its fused gradient.
    w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
    b = None if bias is None else bias()
    return dense(x, w, b, n_in=len(weight.in_shape), out_dtype=out_dtype, activation=activation)
  y = FORMATS[name](module, x, weight, arg, module.precision.format_options)
  if bias is not None:
    y = y + bias()
  y = y.astype(out_dtype)
  return y if activation is None else activation(y)


def stored_bytes(tree: Any) -> int:
  """Bytes the arrays of ``tree`` occupy."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
