"""Integer matmul formats: int8 quantisation-aware training, int8/int4 weight-only storage.

* ``int8`` (training): the float weight is the parameter; every matmul rounds
  the weight to the int8 grid of its per-output-channel scale (amax over the
  contracted axes, per expert for the MoE's) and the input to that of a
  per-tensor or per-token scale (``precision.int8_activations``), then
  contracts the rounded values in the compute dtype. The rounding's gradient
  is the straight-through estimator (:func:`fake_quant`).
* ``int8-weight`` / ``int4-weight`` (generation and evaluation): the weight is
  stored as integers, ``<name>_q`` (int8; int4 two per byte along the
  contracted axis), and ``<name>_scale`` (per output channel for int8, per
  ``precision.group_size`` input rows per output channel for int4), and
  dequantised inside the matmul: ``w = q * scale`` in the compute dtype, then
  the plain contraction. ``llm-mp quantize`` (``llm_mp.quantize``) converts a
  trained run's float weights into them.

Scales are symmetric, ``amax / qmax`` with ``qmax = 2**(bits-1) - 1`` (127 or 7);
the integers are clipped to ``[-qmax, qmax]``.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import PrecisionConfig
from llm_mp.formats.base import Format, Weight, contract, weight_param
from llm_mp.precision import module_path, module_policy


def qmax(bits: int) -> int:
  """The largest integer of the symmetric ``bits``-bit grid: 127 for 8, 7 for 4."""
  return 2 ** (bits - 1) - 1


def symmetric_scale(amax: jax.Array, bits: int) -> jax.Array:
  """``amax / qmax(bits)``, fp32, with 1 where ``amax == 0`` (an all-zero
  channel quantises to zeros under any scale; this avoids dividing by 0)."""
  amax = amax.astype(jnp.float32)
  return jnp.where(amax > 0, amax / qmax(bits), 1.0)


def _round_clip(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  return jnp.clip(jnp.round(x / scale), -qmax(bits), qmax(bits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fake_quant(x: jax.Array, scale: jax.Array, bits: int = 8) -> jax.Array:
  """``x`` rounded to the grid ``scale * {-qmax..qmax}``, in ``x``'s dtype.

  The gradient is the straight-through estimator: the identity where
  ``|x / scale| <= qmax`` (inside the clipping range), zero outside; ``scale``
  gets no gradient (it is measured, not learned).

  Args:
    x: any shape, float.
    scale: broadcastable to ``x`` (per tensor, channel or token), positive.
    bits: width of the integer grid.
  """
  return (_round_clip(x, scale, bits) * scale).astype(x.dtype)


def _fake_quant_fwd(x, scale, bits):
  return fake_quant(x, scale, bits), (x, scale)


def _fake_quant_bwd(bits, res, g):
  x, scale = res
  inside = jnp.abs(x / scale) <= qmax(bits)
  return jnp.where(inside, g, 0).astype(g.dtype), jnp.zeros_like(scale)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def amax_scale(x: jax.Array, axes: tuple[int, ...], bits: int) -> jax.Array:
  """fp32 scale of ``x`` with the ``axes`` reduced (kept as size 1), no gradient."""
  amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=axes, keepdims=True)
  return symmetric_scale(amax, bits)


def int8_qat(module, x, weight: Weight, arg, options: PrecisionConfig) -> jax.Array:
  """``int8``: fake-quantised ``x`` and weight, contracted in the compute dtype."""
  del arg
  n_batch, n_in = len(weight.batch_shape), len(weight.in_shape)
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  w32, x32 = w.astype(jnp.float32), x.astype(jnp.float32)
  # Weights: one scale per output channel (and per expert): amax over the contracted axes.
  w_scale = amax_scale(w32, tuple(range(n_batch, n_batch + n_in)), 8)
  # Activations: one scale per tensor, or per token (amax over its contracted axes).
  token = options.int8_activations == "token"
  x_scale = amax_scale(x32, tuple(range(x.ndim - n_in if token else 0, x.ndim)), 8)
  wq = fake_quant(w32, w_scale, 8).astype(w.dtype)
  xq = fake_quant(x32, x_scale, 8).astype(x.dtype)
  return contract(xq, wq, n_in, n_batch)


# --- weight-only storage ------------------------------------------------------------------------


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
  """int values in ``[-8, 7]`` -> uint8, two per byte along ``axis`` (even
  positions in the low nibble, odd in the high one); ``axis`` halves."""
  q = jax.lax.bitcast_convert_type(q.astype(jnp.int8), jnp.uint8) & 0xF  # two's complement
  q = jnp.moveaxis(q, axis, 0)
  packed = q[0::2] | (q[1::2] << 4)
  return jnp.moveaxis(packed, 0, axis)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
  """The inverse of :func:`pack_int4`: uint8 -> int8 in ``[-8, 7]``; ``axis`` doubles."""
  p = jnp.moveaxis(packed, axis, 0)
  nibbles = jnp.stack([p & 0xF, p >> 4], axis=1).astype(jnp.int8)  # (n, 2, ...)
  values = (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement
  return jnp.moveaxis(values.reshape((-1,) + p.shape[1:]), 0, axis)


def _groups(weight: Weight, bits: int, group_size: int) -> int:
  """Input rows per scale: all of them for int8; ``group_size`` (at most all) for int4."""
  rows = math.prod(weight.in_shape)
  if bits == 8:
    return rows
  group = min(group_size, rows)
  if rows % group or rows % 2:
    raise ValueError(
      f"int4-weight: precision.group_size={group_size} must divide the {rows} input rows "
      f"of weight {weight.name!r} {list(weight.shape)}, and the rows must be even"
    )
  return group


def stored_layout(weight: Weight, bits: int, group_size: int) -> dict[str, tuple]:
  """``{"q": (shape, dtype, axes), "scale": (shape, None, axes)}`` of the stored weight.

  int8: ``q`` int8 of the weight's shape, ``scale [*batch, *out]``. int4:
  the contracted axes flattened to ``K`` rows, ``q`` uint8 ``[*batch, K/2, *out]``
  and ``scale [*batch, K/group, *out]``. The scale's dtype is the param dtype.
  """
  n_batch, n_in = len(weight.batch_shape), len(weight.in_shape)
  batch_axes, out_axes = weight.axes[:n_batch], weight.axes[n_batch + n_in :]
  scale_axes = batch_axes + out_axes
  if bits == 8:
    q = (weight.shape, jnp.int8, weight.axes)
    return {"q": q, "scale": (weight.batch_shape + weight.out_shape, None, scale_axes)}
  rows, group = math.prod(weight.in_shape), _groups(weight, bits, group_size)
  in_axis = weight.axes[n_batch] if n_in == 1 else None
  q_shape = weight.batch_shape + (rows // 2,) + weight.out_shape
  scale_shape = weight.batch_shape + (rows // group,) + weight.out_shape
  return {
    "q": (q_shape, jnp.uint8, batch_axes + (in_axis,) + out_axes),
    "scale": (scale_shape, None, batch_axes + (None,) + out_axes),
  }


def _grouped(w: jax.Array, weight: Weight, group: int) -> jax.Array:
  """``[*batch, *in, *out] -> [*batch, K/group, group, *out]``."""
  rows = math.prod(weight.in_shape)
  return w.reshape(weight.batch_shape + (rows // group, group) + weight.out_shape)


def quantize_weight(
  w: jax.Array, weight: Weight, bits: int, group_size: int, scale_dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """A float weight ``[*batch, *in, *out]`` -> ``(q, scale)`` in :func:`stored_layout`."""
  group = _groups(weight, bits, group_size)
  n_batch = len(weight.batch_shape)
  g = _grouped(w.astype(jnp.float32), weight, group)  # (*batch, K/group, group, *out)
  scale = amax_scale(g, (n_batch + 1,), bits)
  q = _round_clip(g, scale, bits).astype(jnp.int8)
  scale = jnp.squeeze(scale, n_batch + 1).astype(scale_dtype)
  if bits == 8:
    return q.reshape(weight.shape), jnp.squeeze(scale, n_batch)
  rows = math.prod(weight.in_shape)
  q = q.reshape(weight.batch_shape + (rows,) + weight.out_shape)
  return pack_int4(q, n_batch), scale


def dequantize_weight(q: jax.Array, scale: jax.Array, weight: Weight, dtype) -> jax.Array:
  """``q * scale`` in ``dtype``, shaped ``[*batch, *in, *out]`` (the inverse layout of
  :func:`quantize_weight`; int8 or int4 from ``q``'s dtype)."""
  n_batch = len(weight.batch_shape)
  if q.dtype == jnp.uint8:  # int4, two per byte
    q = unpack_int4(q, n_batch)
    group = q.shape[n_batch] // scale.shape[n_batch]
  else:
    group, scale = math.prod(weight.in_shape), jnp.expand_dims(scale, n_batch)
  g = _grouped(q, weight, group).astype(dtype)  # (*batch, K/group, group, *out)
  return (g * jnp.expand_dims(scale.astype(dtype), n_batch + 1)).reshape(weight.shape)


def _stored_weight(module, weight: Weight, bits: int, group_size: int):
  """The ``(q, scale)`` parameters of ``module`` for ``weight``.

  Created by ``model.init`` from a fresh normal draw (a new model is the
  quantised fresh float model), or by ``llm_mp.quantize`` (an ``apply`` with
  ``params`` mutable) from the float ``weight.name`` parameter a trained run holds.
  """
  layout = stored_layout(weight, bits, group_size)
  name_q, name_s = f"{weight.name}_q", f"{weight.name}_scale"
  param_dtype = module_policy(module).param_dtype
  values = None
  if not module.has_variable("params", name_q):
    if module.is_initializing():
      w = weight.init_std * jax.random.normal(module.make_rng("params"), weight.shape)
    elif module.has_variable("params", weight.name):
      w = module.get_variable("params", weight.name)
    else:
      raise ValueError(
        f"{module_path(module)}: neither {name_q!r} nor a float {weight.name!r} to quantise"
      )
    values = quantize_weight(w, weight, bits, group_size, param_dtype)

  def param(name, i, key):
    shape, dtype, axes = layout[key]
    dtype = dtype or param_dtype
    # Stored arrays are read as they are; flax checks their shape against this initialiser.
    init = (lambda _: values[i]) if values is not None else (lambda _: jnp.zeros(shape, dtype))
    return module.param(name, nn.with_logical_partitioning(init, axes))

  return param(name_q, 0, "q"), param(name_s, 1, "scale")


def _weight_only(module, x, weight: Weight, arg, options: PrecisionConfig, bits: int) -> jax.Array:
  """``int8-weight`` / ``int4-weight``: dequantise in the compute dtype, then contract."""
  del arg
  q, scale = _stored_weight(module, weight, bits, options.group_size)
  w = dequantize_weight(q, scale, weight, x.dtype)
  return contract(x, w, len(weight.in_shape), len(weight.batch_shape))


int8_weight = functools.partial(_weight_only, bits=8)
int4_weight = functools.partial(_weight_only, bits=4)


INT8_QAT = Format("int8", int8_qat, options=("int8_activations",))
INT8_WEIGHT = Format("int8-weight", int8_weight, weight_only=True, float_weight=False)
INT4_WEIGHT = Format(
  "int4-weight", int4_weight, weight_only=True, options=("group_size",), float_weight=False
)
