"""fp8 matmuls: e4m3 inputs and weights forward, e5m2 gradients backward, per-tensor scales.

The ``fp8`` format of :mod:`llm_mp.formats` (entry :data:`FP8`). Every fp8 matmul quantises its
input ``x`` and its weight ``W`` to float8 e4m3 (3 mantissa bits, max 448) and
back before the contraction, and the gradient of its product to float8 e5m2
(2 mantissa bits, max 57344) and back before the two backward contractions.
Each of the three tensors has one scale (per tensor; the MoE's ``[E, d, f]``
experts share one).

Scales follow flax's convention: ``quantize`` divides by the scale, saturates
at ``±fp8_max`` and casts; ``dequantize`` casts back and multiplies. A tensor
whose amax is ``a`` gets ``scale = a / fp8_max * 2**margin``
(``precision.fp8_margin``; flax's ``compute_scale``; the previous scale is
kept when ``a`` is 0 or not finite), so its largest entry lands at
``fp8_max / 2**margin``. ``precision.fp8_scaling`` picks ``a``:

* ``delayed``: the largest amax in a history of the last
  ``precision.amax_history`` steps (this step's amax is not in it yet; it
  enters at index 0, flax's ``compute_amax_history``). The scales and
  histories of input, kernel and output gradient are float32 variables of
  the collection :data:`FP8_META` (``{weight}_{input,kernel,output_grad}_scale``
  ``[]`` and ``..._amax_history [amax_history]``), part of
  ``TrainState.model_state``, so they are checkpointed and restored with the
  state. As in flax, the custom VJPs below return the new values as the
  *gradients* of the old ones ("overwrite with gradient"): the train step
  (``llm_mp.step``) differentiates with respect to that collection too and
  takes the result as its new value.
* ``current``: the amax of the tensor itself (no state; one more reduction
  per tensor before its cast).

A forward that has no :data:`FP8_META` to read and may not create it (a
params-only evaluation, generation from params) scales by the current amax.

Why flax's ops (``flax.linen.fp8_ops``: ``qdq``, ``compute_scale``,
``compute_amax_history``, ``get_fp8_max``) and not qwix (not installed) or
casts written here: the quantise-dequantise pattern they emit around a
``dot_general`` (convert to f8, convert back, multiply by the scale) is the
one XLA's GPU compiler rewrites into an fp8 GEMM on H100, and flax keeps the
delayed-scaling state as variables updated through gradients, which is
exactly ``model_state``. flax's ``in_qdq`` / ``out_qdq`` fix the margin at 0
(their ``update_fp8_meta`` calls ``compute_scale`` without one), so
:func:`in_qdq` / :func:`out_qdq` are those two custom VJPs with the margin
passed through and with current scaling as a history of one entry. On CPU the
float8 types are emulated (ml_dtypes): the quantised values are a GPU's, the
accumulation order and the speed are not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from llm_mp.config import PrecisionConfig
from llm_mp.formats.base import Format, contract, weight_param

# The flax collection of the delayed-scaling state (in TrainState.model_state).
FP8_META = "fp8_meta"
E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
# The three scaled tensors of a matmul and their formats.
ROLES = (("input", E4M3), ("kernel", E4M3), ("output_grad", E5M2))


def update_meta(
  x: jax.Array, q_dtype, scale: jax.Array, history: jax.Array, margin: int, current: bool
) -> tuple[jax.Array, jax.Array]:
  """The scale to quantise ``x`` with and the history after ``x``.

  Args:
    x: the tensor, any float dtype and shape.
    q_dtype: ``E4M3`` or ``E5M2`` (its max sets the scale).
    scale: float32 ``[]``, the previous scale (kept if the amax is 0 or not finite).
    history: float32 ``[n]``, previous amaxes, newest at index 0.
    margin: ``precision.fp8_margin``.
    current: scale from ``x``'s own amax (else from ``history`` before ``x``).

  Returns:
    ``(scale [], history [n])``, float32: ``amax / fp8_max * 2**margin`` and
    ``history`` rolled with ``max|x|`` written at index 0.
  """
  new_history = fp8_ops.compute_amax_history(x, history)
  amax = jnp.max(new_history if current else history, axis=0)
  fp8_max = fp8_ops.get_fp8_max(q_dtype, jnp.float32)
  return fp8_ops.compute_scale(amax, scale, fp8_max, margin), new_history


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def in_qdq(q_dtype, margin: int, current: bool, x, scale, history):
  """``x`` quantised to ``q_dtype`` and back (same dtype and shape) with the scale of
  :func:`update_meta`. Backward: ``x``'s gradient passes straight through, and
  ``scale`` / ``history`` receive their new values as gradients."""
  return _in_qdq_fwd(q_dtype, margin, current, x, scale, history)[0]


def _in_qdq_fwd(q_dtype, margin, current, x, scale, history):
  new_scale, new_history = update_meta(x, q_dtype, scale, history, margin, current)
  return fp8_ops.qdq(x, q_dtype, new_scale, x.dtype), (new_scale, new_history)


def _in_qdq_bwd(q_dtype, margin, current, new_meta, g):
  del q_dtype, margin, current
  return (g, *new_meta)


in_qdq.defvjp(_in_qdq_fwd, _in_qdq_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def out_qdq(q_dtype, margin: int, current: bool, y, scale, history):
  """``y`` unchanged. Backward: ``y``'s gradient quantised to ``q_dtype`` and back with
  the scale of :func:`update_meta` applied to the gradient, and ``scale`` /
  ``history`` receive their new values as gradients."""
  del q_dtype, margin, current, scale, history
  return y


def _out_qdq_fwd(q_dtype, margin, current, y, scale, history):
  del q_dtype, margin, current
  return y, (scale, history)


def _out_qdq_bwd(q_dtype, margin, current, meta, g):
  new_scale, new_history = update_meta(g, q_dtype, *meta, margin, current)
  return fp8_ops.qdq(g, q_dtype, new_scale, g.dtype), new_scale, new_history


out_qdq.defvjp(_out_qdq_fwd, _out_qdq_bwd)


def _meta(module, name: str, options: PrecisionConfig) -> tuple[dict, bool]:
  """``({role: (scale [], history [n])}, current)`` for the weight ``name`` of ``module``:
  its :data:`FP8_META` variables under delayed scaling, else constants
  (scale 1, a one-entry history) that make the scaling current."""
  stored = module.is_mutable_collection(FP8_META) or module.has_variable(
    FP8_META, f"{name}_input_scale"
  )
  if options.fp8_scaling == "current" or not stored:
    one = (jnp.ones((), jnp.float32), jnp.zeros((1,), jnp.float32))
    return {role: one for role, _ in ROLES}, True
  meta = {}
  for role, _ in ROLES:
    scale = module.variable(FP8_META, f"{name}_{role}_scale", jnp.ones, (), jnp.float32)
    history = module.variable(
      FP8_META, f"{name}_{role}_amax_history", jnp.zeros, (options.amax_history,), jnp.float32
    )
    meta[role] = (scale.value, history.value)
  return meta, False


def fp8_matmul(module, x: jax.Array, weight, arg, options: PrecisionConfig) -> jax.Array:
  """``x @ W`` with ``x`` and ``W`` in e4m3 and the product's gradient in e5m2.

  Args:
    module: the bound module owning the weight (its parameter, and its
      :data:`FP8_META` variables under delayed scaling).
    x: ``[*batch, ..., *in]`` in the compute dtype.
    weight: the weight's description (a ``formats.Weight``).
    arg: unused (``fp8`` takes no argument).
    options: ``fp8_scaling``, ``amax_history``, ``fp8_margin``.

  Returns:
    ``[*batch, ..., *out]`` in the compute dtype.
  """
  del arg
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  meta, current = _meta(module, weight.name, options)
  m = options.fp8_margin
  x = in_qdq(E4M3, m, current, x, *meta["input"])
  w = in_qdq(E4M3, m, current, w, *meta["kernel"])
  y = contract(x, w, len(weight.in_shape), len(weight.batch_shape))
  return out_qdq(E5M2, m, current, y, *meta["output_grad"])


FP8 = Format(
  "fp8",
  fp8_matmul,
  collection=FP8_META,
  overwrite_with_gradient=True,
  options=("fp8_scaling", "amax_history", "fp8_margin"),
)
