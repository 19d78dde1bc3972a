"""Loss scales as pytrees, and the rule that skips non-finite updates.

Same protocol as jmp (``scale``, ``unscale``, ``adjust(grads_finite)``), but
built on ``flax.struct`` so every configuration field survives ``jax.jit``
(jmp 0.0.4's ``DynamicLossScale`` drops a custom ``min_loss_scale`` when
flattened). All updates are branch-free (``jnp.where``), so they run inside a
jitted train step.
"""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
import jmp
from flax import struct

LOSS_SCALES = ("none", "static", "dynamic")


def _scale_tree(tree: Any, factor: jax.Array) -> Any:
  return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)


def _unscale_tree(tree: Any, scale: jax.Array) -> Any:
  # Divide in fp32 so fp16/bf16 gradients neither overflow nor lose bits here.
  inv = 1.0 / scale.astype(jnp.float32)
  return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), tree)


@struct.dataclass
class NoOpLossScale:
  """No scaling: ``scale``/``unscale`` are the identity; ``loss_scale`` is 1."""

  @property
  def loss_scale(self) -> jax.Array:
    return jnp.ones((), jnp.float32)

  def scale(self, tree: Any) -> Any:
    return tree

  def unscale(self, tree: Any) -> Any:
    return tree

  def adjust(self, grads_finite: jax.Array) -> "NoOpLossScale":
    del grads_finite
    return self


@struct.dataclass
class StaticLossScale:
  """A fixed scale: fp32 ``loss_scale`` ``[]``."""

  loss_scale: jax.Array

  def scale(self, tree: Any) -> Any:
    return _scale_tree(tree, self.loss_scale)

  def unscale(self, tree: Any) -> Any:
    return _unscale_tree(tree, self.loss_scale)

  def adjust(self, grads_finite: jax.Array) -> "StaticLossScale":
    del grads_finite
    return self


@struct.dataclass
class DynamicLossScale:
  """Shrinks on overflow, grows after ``period`` finite steps in a row.

  Attributes:
    loss_scale: fp32 ``[]``, the current scale.
    counter: int32 ``[]``, finite steps since the last change.
    period: finite steps before the scale is multiplied by ``factor``.
    factor: growth and shrink factor.
    min_loss_scale: the scale never shrinks below this.
  """

  loss_scale: jax.Array
  counter: jax.Array
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_loss_scale: float = struct.field(pytree_node=False, default=1.0)

  def scale(self, tree: Any) -> Any:
    return _scale_tree(tree, self.loss_scale)

  def unscale(self, tree: Any) -> Any:
    return _unscale_tree(tree, self.loss_scale)

  def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
    """Non-finite: scale / factor (>= min), counter 0. Finite: counter + 1, and
    at ``period`` the scale * factor and counter 0."""
    grow = grads_finite & (self.counter + 1 >= self.period)
    grown = jnp.where(grow, self.loss_scale * self.factor, self.loss_scale)
    shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
    new_scale = jnp.where(grads_finite, grown, shrunk).astype(jnp.float32)
    counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0).astype(jnp.int32)
    return self.replace(loss_scale=new_scale, counter=counter)


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]


def make_loss_scale(kind: str, init_scale: float = 2.0**15, period: int = 2000) -> LossScale:
  """``kind`` in none/static/dynamic; ValueError listing the valid kinds."""
  if kind == "none":
    return NoOpLossScale()
  if kind == "static":
    return StaticLossScale(jnp.asarray(init_scale, jnp.float32))
  if kind == "dynamic":
    return DynamicLossScale(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32),
                            period=period)
  raise ValueError(f"unknown loss_scale {kind!r}; valid: {list(LOSS_SCALES)}")


def all_finite(tree: Any) -> jax.Array:
  """bool ``[]``: every element of every leaf is finite."""
  return jmp.all_finite(tree)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise ``jnp.where(pred, a, b)``: picks whole trees bit for bit (a zero
  update would not: -0.0 + 0.0 is +0.0)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
