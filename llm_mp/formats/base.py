"""What every matmul format builds on: the weight's description, the contraction, the
format entry, and the plain format ``none``.

A format is a :class:`Format` entry (``llm_mp.formats.registry`` holds them by
name) whose ``matmul`` computes ``x @ W`` for one weight::

  matmul(module, x, weight, arg, options) -> y

``module`` is the bound flax module that owns the weight (the format creates
its parameters, and any state, with ``module.param`` / ``module.variable``),
``x`` the input in the compute dtype, ``weight`` a :class:`Weight`, ``arg``
what follows ``:`` in the format's name (``lowrank:64`` -> ``"64"``, else
``None``) and ``options`` the run's :class:`~llm_mp.config.PrecisionConfig`
(the fields the entry lists in ``options``). It returns ``x @ W`` in the
compute dtype, before bias and activation.

This module imports nothing of the formats above it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.precision import module_policy


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


@dataclasses.dataclass(frozen=True)
class Format:
  """One matmul format: everything the rest of llm_mp asks about it.

  Attributes:
    name: what ``precision.formats`` calls it (``"fp8"``; ``"lowrank"`` for
      ``lowrank:64``).
    matmul: ``fn(module, x, weight, arg, options) -> y`` (module docstring).
    parse_arg: ``fn(arg, field) -> value`` for a format that takes an argument
      after ``:``, raising ValueError naming ``field``; None if it takes none.
    collection: the flax collection of its non-parameter state (kept in
      ``TrainState.model_state``, checkpointed, scanned with the blocks), or None.
    overwrite_with_gradient: the gradient of ``collection`` is its new value
      (flax's fp8 convention); the train step takes it so.
    weight_only: it stores weights no gradient reaches (integers), for
      evaluation and generation; training refuses it.
    options: the :class:`~llm_mp.config.PrecisionConfig` fields it reads.
    fused: ``fn(module, x, weight, bias, activation, out_dtype) -> y`` doing the
      whole of :func:`llm_mp.formats.matmul` for a weight without batch axes
      (bias, activation and cast inside one gradient), or None.
    float_weight: it keeps each weight as the float parameter of the weight's name
      (with any state beside it), so what reads plain checkpoints (``export-hf``,
      ``diagnose``) reads its runs; False for integers and scales, or factors.
  """

  name: str
  matmul: Callable[..., jax.Array]
  parse_arg: Callable[[str | None, str], Any] | None = None
  collection: str | None = None
  overwrite_with_gradient: bool = False
  weight_only: bool = False
  options: tuple[str, ...] = ()
  fused: Callable[..., jax.Array] | None = None
  float_weight: bool = True


def _dense_2d_fwd(x, kernel, bias, out_dtype, activation):
  pre = jnp.dot(x, kernel)  # (M, N)
  if bias is not None:
    pre = pre + bias
  pre = pre.astype(out_dtype)
  y = pre if activation is None else activation(pre)
  return y, (x, kernel, bias, None if activation is None else pre)


def _dense_2d_bwd(out_dtype, activation, res, g):
  del out_dtype  # the cast's cotangent goes back to x's dtype below
  x, kernel, bias, pre = res
  if activation is not None:
    # The barrier makes XLA recompute the activation's internals (GELU's tanh)
    # from the saved pre-activation in one fused pass, instead of keeping the
    # forward's intermediates alive until the backward pass.
    g = jax.vjp(activation, jax.lax.optimization_barrier(pre))[1](g)[0]
  g = g.astype(x.dtype)  # (M, N)
  dx = jnp.dot(g, kernel.T)  # (M, K)
  dkernel = jnp.dot(x.T, g)  # (K, N)
  return dx, dkernel, None if bias is None else g.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_2d(x, kernel, bias, out_dtype, activation):
  return _dense_2d_fwd(x, kernel, bias, out_dtype, activation)[0]


_dense_2d.defvjp(_dense_2d_fwd, _dense_2d_bwd)


def dense(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None = None,
  *,
  n_in: int = 1,
  out_dtype=None,
  activation: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """``activation((x @ kernel + bias).astype(out_dtype))`` contracting ``n_in`` axes.

  The forward pass is the plain ``dot_general`` formulation (same ops, same
  dtypes). The gradient is jax autodiff's up to summation order, but computed
  as plain 2-D matmuls on ``[M, K]`` / ``[K, N]`` views, with the activation's
  derivative taken once from the saved pre-activation. Autodiff of an N-D
  ``dot_general`` followed by the activation instead gives XLA:CPU a dW dot
  on a transposed copy of the incoming gradient, and XLA fuses the residual
  stream's whole gradient chain into every such copy (2x slower backward).

  Args:
    x: ``[..., *in_shape]`` (the last ``n_in`` axes are contracted).
    kernel: ``[*in_shape, *out_shape]``, in ``x``'s dtype.
    bias: ``[*out_shape]`` in ``x``'s dtype, or None.
    n_in: number of contracted axes.
    out_dtype: dtype of the result and of the activation's input (default:
      ``x``'s). The matmul and the bias addition run in ``x``'s dtype.
    activation: elementwise function applied last, or None.

  Returns:
    ``[..., *out_shape]`` in ``out_dtype``.
  """
  batch_shape, in_shape = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
  out_shape = kernel.shape[n_in:]
  k, n = math.prod(in_shape), math.prod(out_shape)
  y = _dense_2d(
    x.reshape(-1, k),
    kernel.reshape(k, n),  # (M, K) @ (K, N)
    None if bias is None else bias.reshape(n),
    jnp.dtype(out_dtype or x.dtype),
    activation,
  )
  return y.reshape(batch_shape + out_shape)


def contract(x: jax.Array, w: jax.Array, n_in: int, n_batch: int = 0) -> jax.Array:
  """``x [*batch, ..., *in] @ w [*batch, *in, *out] -> [*batch, ..., *out]`` in x's dtype.

  Without batch axes this is :func:`dense` (its 2-D gradient formulation); with
  them a batched ``dot_general`` (the experts).
  """
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


def plain_matmul(module, x: jax.Array, weight: Weight, arg, options) -> jax.Array:
  """The ``none`` format: the weight in the policy's param dtype, ``x @ W`` in the
  compute dtype (``x``'s)."""
  del arg, options
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  return contract(x, w, len(weight.in_shape), len(weight.batch_shape))


def plain_fused(module, x: jax.Array, weight: Weight, bias, activation, out_dtype) -> jax.Array:
  """The ``none`` format of a weight without batch axes: :func:`dense` with the bias
  and the activation inside its fused gradient."""
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  b = None if bias is None else bias()
  return dense(x, w, b, n_in=len(weight.in_shape), out_dtype=out_dtype, activation=activation)


# The weight in the dtype policy alone (everything above 16 bits).
PLAIN = Format("none", plain_matmul, fused=plain_fused)


def stored_bytes(tree: Any) -> int:
  """Bytes the arrays of ``tree`` occupy."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
