"""Low-rank factorised weights: the ``lowrank:R`` matmul format and truncated-SVD factors.

Under ``precision.formats=...=lowrank:R`` a weight ``W [*batch, *in, *out]``
(``K = prod(in)``, ``N = prod(out)``) is stored as two factors, ``<name>_u
[*batch, *in, R]`` and ``<name>_v [*batch, R, *out]``, and the layer computes
``y = (x @ U) @ V`` in the compute dtype: ``R * (K + N)`` parameters and
FLOPs per token instead of ``K * N``. ``U`` keeps the weight's input axes'
logical names and ``V`` its output axes' (the rank axis is unnamed, so
replicated), so the sharding rules still apply.

Initialisation from scratch (``init_std`` = ``s``, the dense layer's): ``U ~
N(0, 1/K)`` and ``V ~ N(0, s^2 K / R)``. An entry of ``U @ V`` is a sum of
``R`` independent products, so its variance is ``R * var(U) * var(V) =
s^2``: the product has the dense init's scale (and so does ``x @ U @ V`` for
any ``x``, since distinct rows of ``U @ V`` are uncorrelated), while ``x @ U``
keeps the scale of ``x`` (the ``K`` inputs of unit scale sum to unit scale),
which is what a 16-bit compute dtype needs of the rank-R intermediate.

A trained dense weight becomes the factors of its truncated SVD
(:func:`svd_factors`, :func:`factorize`): ``W = A S B^T`` (per batch entry,
``W`` seen as ``[K, N]``) gives ``U = A_R sqrt(S_R)``, ``V = sqrt(S_R) B_R^T``,
the best rank-``R`` approximation in the Frobenius norm (Eckart-Young: the
error is the norm of the dropped singular values). ``llm_mp.lowrank_convert``
converts whole runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from llm_mp.formats.base import Format, Weight, contract, weight_param


def parse_rank(arg: str | None, field: str = "precision.formats") -> int:
  """The rank of ``lowrank:R`` from its argument ``"R"``; ValueError naming ``field``
  and the value unless it is a positive integer."""
  try:
    rank = int(arg)
  except (TypeError, ValueError):
    rank = 0
  if rank < 1 or str(arg).strip() != str(rank):
    raise ValueError(f"{field}: lowrank:{arg or ''} needs a positive integer rank, as lowrank:64")
  return rank


def factor_stds(weight: Weight, rank: int) -> tuple[float, float]:
  """``(std of U, std of V)`` such that the entries of ``U @ V`` have std ``weight.init_std``
  (``R * var(U) * var(V) = init_std^2``, with ``var(U) = 1/K``)."""
  k = math.prod(weight.in_shape)
  return 1.0 / math.sqrt(k), weight.init_std * math.sqrt(k / rank)


def lowrank_matmul(module, x: jax.Array, weight: Weight, arg: str | None, options) -> jax.Array:
  """The ``lowrank:R`` format: ``x [*batch, ..., *in] -> (x @ U) @ V [*batch, ..., *out]``
  in ``x``'s (the compute) dtype, with ``U [*batch, *in, R]`` and ``V [*batch, R, *out]``
  parameters ``<name>_u`` / ``<name>_v`` of ``module``."""
  del options  # the format has no settings beyond its rank
  rank = parse_rank(arg)
  n_batch, n_in = len(weight.batch_shape), len(weight.in_shape)
  std_u, std_v = factor_stds(weight, rank)
  batch_axes = weight.axes[:n_batch]
  u_weight = dataclasses.replace(weight, axes=weight.axes[: n_batch + n_in] + (None,))
  v_weight = dataclasses.replace(weight, axes=batch_axes + (None,) + weight.axes[n_batch + n_in :])
  u = weight_param(
    module, u_weight, f"{weight.name}_u", weight.batch_shape + weight.in_shape + (rank,), std_u
  )
  v = weight_param(
    module, v_weight, f"{weight.name}_v", weight.batch_shape + (rank,) + weight.out_shape, std_v
  )
  h = contract(x, u, n_in, n_batch)  # (*batch, ..., R)
  return contract(h, v, 1, n_batch)  # (*batch, ..., *out)


def svd_factors(kernel: Any, n_batch: int, n_in: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Truncated-SVD factors of a dense kernel, in float64.

  Args:
    kernel: ``[*batch, *in, *out]`` (any float dtype); each batch entry is
      factorised as one ``[K, N]`` matrix.
    n_batch, n_in: how many leading axes are batch axes, and how many after
      them are contracted.
    rank: ``R``. Past ``min(K, N)`` the factors are padded with zeros, so
      ``U @ V`` is then ``kernel`` itself.

  Returns:
    ``(U [*batch, *in, R], V [*batch, R, *out])``, float64, with ``sqrt(S)``
    in both: ``U @ V`` is the best rank-``R`` approximation of ``kernel``.
  """
  w = np.asarray(kernel, np.float64)
  batch, inn, out = w.shape[:n_batch], w.shape[n_batch : n_batch + n_in], w.shape[n_batch + n_in :]
  a, s, bt = np.linalg.svd(w.reshape(batch + (math.prod(inn), math.prod(out))), full_matrices=False)
  kept = min(rank, s.shape[-1])
  root = np.sqrt(s[..., :kept])  # (*batch, kept)
  u = a[..., :kept] * root[..., None, :]  # (*batch, K, kept)
  v = root[..., :, None] * bt[..., :kept, :]  # (*batch, kept, N)
  pad = rank - kept
  u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
  v = np.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, pad), (0, 0)])
  return u.reshape(batch + inn + (rank,)), v.reshape(batch + (rank,) + out)


def _factor_pairs(dense: dict[str, Any], want: dict[str, Any]) -> dict[str, tuple[int, int]]:
  """``{dense path: (n_batch, n_in)}`` of each dense kernel (flat ``dense``) that the
  low-rank model (flat ``want``) holds as ``<path>_u`` / ``<path>_v``. Leading axes the
  factors share (MoE experts, scanned layers) are batch axes: ``len(u) + len(v) - 2 -
  len(w)`` of them."""
  pairs = {}
  for path, u in want.items():
    base = path[:-2]
    if path.endswith("_u") and base in dense and f"{base}_v" in want:
      n_batch = len(u.shape) + len(want[f"{base}_v"].shape) - 2 - len(np.shape(dense[base]))
      pairs[base] = (n_batch, len(u.shape) - n_batch - 1)
  return pairs


def rank_limits(params: Any, abstract: Any) -> dict[str, int]:
  """``{path: min(K, N)}`` of each dense kernel of ``params`` that the low-rank model
  (``abstract``, as for :func:`factorize`) factorises: a rank at or above it stores more
  than the kernel, exactly."""
  dense = traverse_util.flatten_dict(params, sep="/")
  pairs = _factor_pairs(dense, traverse_util.flatten_dict(abstract, sep="/"))
  limits = {}
  for path, (n_batch, n_in) in pairs.items():
    shape = np.shape(dense[path])
    k, n = math.prod(shape[n_batch : n_batch + n_in]), math.prod(shape[n_batch + n_in :])
    limits[path] = min(k, n)
  return limits


def factorize(params: Any, abstract: Any) -> tuple[dict[str, Any], list[str]]:
  """Parameters of a low-rank model from a dense model's.

  Args:
    params: the dense model's parameters (nested dicts of arrays).
    abstract: the low-rank model's parameters or their shapes
      (``jax.ShapeDtypeStruct``), e.g. from ``jax.eval_shape`` of its init.

  Returns:
    ``(new_params, factorised)``: numpy arrays in ``abstract``'s tree, shapes
    and dtypes, and the paths of the dense kernels that were factorised. A
    parameter present in both is copied; a pair ``<name>_u`` / ``<name>_v``
    the dense model holds as ``<name>`` takes its :func:`svd_factors` at the
    rank of ``_u``'s last axis (batch axes as :func:`_factor_pairs` finds them).

  Raises:
    ValueError: a parameter the dense model lacks, or holds with another
      shape (path and shapes named).
  """
  dense = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  pairs = _factor_pairs(dense, want)
  out, factorised = {}, []
  for path, target in want.items():
    base = path[:-2]
    if path in dense:
      if tuple(np.shape(dense[path])) != tuple(target.shape):
        raise ValueError(
          f"params: {path} has shape {list(np.shape(dense[path]))}, the low-rank model "
          f"needs {list(target.shape)}"
        )
      out[path] = np.asarray(dense[path]).astype(target.dtype)
    elif path.endswith("_u") and base in pairs:
      u, v = svd_factors(dense[base], *pairs[base], target.shape[-1])
      out[path] = u.astype(target.dtype)
      out[f"{base}_v"] = v.astype(want[f"{base}_v"].dtype)
      factorised.append(base)
    elif not (path.endswith("_v") and f"{base}_u" in want and base in dense):
      raise ValueError(f"params: {path} is missing from the dense model")
  return traverse_util.unflatten_dict(out, sep="/"), factorised


LOWRANK = Format("lowrank", lowrank_matmul, parse_arg=parse_rank, float_weight=False)
