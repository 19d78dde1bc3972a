"""Loss scales as pytrees, and the rule that skips non-finite updates.

Same protocol as jmp (``scale``, ``unscale``, ``adjust(grads_finite)``,
``loss_scale``), but built on ``flax.struct`` so every configuration field
survives ``jax.jit`` (jmp 0.0.4's ``DynamicLossScale`` drops a custom
``min_loss_scale`` when flattened). Updates are branch-free (``jnp.where``), so
they run inside a jitted train step. The order, as in jmp's README: scale the
loss, take gradients, ``unscale``, :func:`all_finite`, clip and update, then
keep the old params and optimizer state with :func:`select_tree` and
``adjust`` the scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jmp
from flax import struct

from llm_mp.config import LOSS_SCALES

_FP32_MAX = float(jnp.finfo(jnp.float32).max)


class _ScalesByArray:
  """``scale``/``unscale`` for the scales that hold a fp32 ``loss_scale`` array."""

  loss_scale: jax.Array

  def scale(self, tree: Any) -> Any:
    """Each leaf times the scale, in the leaf's dtype (a loss: fp32 ``[]``)."""
    return jax.tree.map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

  def unscale(self, tree: Any) -> Any:
    """Each leaf cast to fp32 and divided by the scale: fp32 gradients whatever
    the params' dtype (grads of fp32 params are fp32 already)."""
    # In fp32: g / scale computed in fp16 would flush small gradients to zero.
    inv = 1.0 / self.loss_scale.astype(jnp.float32)
    return jax.tree.map(lambda g: g.astype(jnp.float32) * inv, tree)


@struct.dataclass
class NoOpLossScale:
  """No scaling: ``scale`` is the identity, ``loss_scale`` is fp32 ``1``."""

  @property
  def loss_scale(self) -> jax.Array:
    return jnp.ones((), jnp.float32)

  def scale(self, tree: Any) -> Any:
    return tree

  def unscale(self, tree: Any) -> Any:
    """The gradients cast to fp32 (the same leaves for fp32 params)."""
    return jax.tree.map(lambda g: g.astype(jnp.float32), tree)

  def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
    del grads_finite
    return self


@struct.dataclass
class StaticLossScale(_ScalesByArray):
  """A fixed scale.

  Attributes:
    loss_scale: fp32 ``[]``.
  """

  loss_scale: jax.Array

  def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
    del grads_finite
    return self


@struct.dataclass
class DynamicLossScale(_ScalesByArray):
  """Shrinks on overflow, grows after ``period`` finite steps in a row.

  Attributes:
    loss_scale: fp32 ``[]``, the current scale.
    counter: int32 ``[]``, finite steps since the scale last changed.
    period: finite steps in a row before the scale is multiplied by ``factor``.
    factor: growth and shrink factor.
    min_loss_scale: the scale never shrinks below this.
  """

  loss_scale: jax.Array
  counter: jax.Array
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_loss_scale: float = struct.field(pytree_node=False, default=1.0)

  def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
    """The scale after a step whose gradients were (bool ``[]``) all finite.

    Non-finite: scale / factor (not below ``min_loss_scale``), counter 0.
    Finite: counter + 1; on the ``period``-th, scale * factor and counter 0.
    """
    grow = grads_finite & (self.counter + 1 >= self.period)
    # Capped at the fp32 maximum: an inf scale would stay inf when divided.
    grown = jnp.where(grow, jnp.minimum(self.loss_scale * self.factor, _FP32_MAX), self.loss_scale)
    shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
    new_scale = jnp.where(grads_finite, grown, shrunk).astype(jnp.float32)
    counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0).astype(jnp.int32)
    return self.replace(loss_scale=new_scale, counter=counter)


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def make_loss_scale(kind: str, init_scale: float = 2.0**15, period: int = 2000) -> LossScale:
  """A loss scale of ``kind`` "none", "static" or "dynamic".

  Args:
    kind: one of :data:`LOSS_SCALES`.
    init_scale: the (initial) scale; ignored by "none".
    period: finite steps before a dynamic scale doubles.

  Raises:
    ValueError: unknown ``kind``; the message lists the valid ones.
  """
  if kind == "none":
    return NoOpLossScale()
  if kind == "static":
    return StaticLossScale(jnp.asarray(init_scale, jnp.float32))
  if kind == "dynamic":
    return DynamicLossScale(
      jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), period=period
    )
  raise ValueError(f"unknown loss_scale {kind!r}; valid: {list(LOSS_SCALES)}")


def all_finite(tree: Any) -> jax.Array:
  """bool ``[]``: every element of every leaf is finite."""
  return jmp.all_finite(tree)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` if ``pred`` (bool ``[]``) else ``on_false``, bit for bit.

  Used to skip a non-finite step: ``select_tree(finite, new_params, params)``.
  A selection keeps every bit of the rejected side out (adding a zero update
  would not: -0.0 + 0.0 is +0.0), and ``lax.select`` insists the two trees
  agree leaf by leaf in shape and dtype, so a dtype drift fails loudly.
  """
  pred = jnp.asarray(pred, bool)
  return jax.tree.map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)
