"""Where each floating-point format's range ends, and where an array's values fall in it.

:func:`format_range` gives a format's thresholds under round-to-nearest-even
(:class:`FormatRange`); :func:`classify` counts the entries a cast would flush to
zero, make subnormal or overflow; :func:`exponent_histogram` bins ``floor(log2 |x|)``.
Plain NumPy on host arrays, compared in float64; :mod:`llm_mp.numerics` applies
them to a model's activations, weights and gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

# Name -> the ml_dtypes type whose finfo gives the range. e4m3 is the "fn"
# variant used for fp8 training (no infinities; 0x7f/0xff are NaN).
FORMATS: Mapping[str, Any] = {
  "fp16": np.float16,
  "bf16": ml_dtypes.bfloat16,
  "fp8_e4m3": ml_dtypes.float8_e4m3fn,
  "fp8_e5m2": ml_dtypes.float8_e5m2,
}
_EXP_OFFSET = 1100  # float64 exponents lie in [-1075, 1023]: bin = exponent + offset


@dataclasses.dataclass(frozen=True)
class FormatRange:
  """The range of a floating-point format under round-to-nearest-even.

  A finite nonzero ``x`` cast to the format becomes

  * zero (flushed) when ``|x| <= flush_at = smallest_subnormal / 2`` (the tie
    at exactly half rounds to the even neighbour, 0);
  * subnormal when ``flush_at < |x| < normal_at = smallest_normal -
    smallest_subnormal / 2`` (above that it rounds up to the smallest normal);
  * an overflow when ``|x| > overflow_at = max + ulp(max) / 2``, or ``>=``
    when ``overflow_tie_up``: the tie rounds to even, which is past ``max``
    when ``max``'s last mantissa bit is 1 (fp16, bf16, e5m2: all ones; but
    e4m3fn's max 448 = 1.110b x 2^8 is even, so 464 rounds down to 448).
    An overflow is inf (NaN for e4m3fn, which has no inf) in a plain cast, or
    ``max`` in a saturating one.

  Hardware that flushes subnormals to zero (FTZ) turns the subnormal band into
  zeros too.
  """

  name: str
  smallest_subnormal: float
  smallest_normal: float
  max: float
  flush_at: float
  normal_at: float
  overflow_at: float
  overflow_tie_up: bool

  @property
  def exponents(self) -> tuple[int, int, int]:
    """``(smallest subnormal, smallest normal, largest)`` base-2 exponents."""
    return (
      int(math.log2(self.smallest_subnormal)),
      int(math.log2(self.smallest_normal)),
      math.floor(math.log2(self.max)),
    )


def format_range(name: str) -> FormatRange:
  """The :class:`FormatRange` of ``name`` (a key of :data:`FORMATS`).

  Raises:
    ValueError: an unknown format name.
  """
  if name not in FORMATS:
    raise ValueError(f"unknown format {name!r}; known: {list(FORMATS)}")
  info = ml_dtypes.finfo(FORMATS[name])
  sub, normal, top = (float(info.smallest_subnormal), float(info.smallest_normal), float(info.max))
  ulp_max = 2.0 ** (info.maxexp - 1 - info.nmant)  # spacing of the top binade
  odd = int(top / ulp_max) % 2 == 1
  return FormatRange(
    name,
    sub,
    normal,
    top,
    flush_at=sub / 2,
    normal_at=normal - sub / 2,
    overflow_at=top + ulp_max / 2,
    overflow_tie_up=odd,
  )


def classify(x: Any, fmt: str | FormatRange) -> dict[str, int]:
  """Counts what a cast of ``x`` to ``fmt`` does to its entries.

  Args:
    x: any array of real numbers (compared in float64, which holds every
      threshold exactly).
    fmt: a :data:`FORMATS` name or a :class:`FormatRange`.

  Returns:
    ints: ``size``, ``zeros`` (exactly zero already), ``flush`` (nonzero,
    becomes 0), ``subnormal`` (becomes subnormal), ``overflow`` (finite,
    exceeds the range), ``nonfinite`` (inf or NaN already).
  """
  r = format_range(fmt) if isinstance(fmt, str) else fmt
  a = np.abs(np.asarray(x, np.float64)).ravel()
  finite = np.isfinite(a)
  over = a >= r.overflow_at if r.overflow_tie_up else a > r.overflow_at
  return {
    "size": int(a.size),
    "zeros": int(np.sum(a == 0)),
    "flush": int(np.sum((a > 0) & (a <= r.flush_at))),
    "subnormal": int(np.sum((a > r.flush_at) & (a < r.normal_at))),
    "overflow": int(np.sum(finite & over)),
    "nonfinite": int(np.sum(~finite)),
  }


def format_fractions(x: Any, formats: Sequence[str] = tuple(FORMATS)) -> dict[str, dict]:
  """``{format: {"flush", "subnormal", "overflow"}}``: fractions of all entries of ``x``."""
  out = {}
  for name in formats:
    c = classify(x, name)
    n = max(c["size"], 1)
    out[name] = {k: c[k] / n for k in ("flush", "subnormal", "overflow")}
  return out


def exponent_histogram(x: Any) -> dict[str, Any]:
  """Histogram of ``floor(log2 |x|)`` over the finite nonzero entries of ``x``.

  Returns:
    ``{"min_exponent": e0, "counts": [n(e0), n(e0 + 1), ...], "zeros": n,
    "nonfinite": n, "size": n}``; ``counts`` spans the smallest to the largest
    exponent present (``min_exponent`` None and no counts when there is none).
  """
  a = np.asarray(x, np.float64).ravel()
  finite = np.isfinite(a)
  nz = a[finite & (a != 0)]
  # frexp: x = m * 2^e with 0.5 <= |m| < 1, so floor(log2 |x|) = e - 1 exactly.
  exps = np.frexp(nz)[1].astype(np.int64) - 1
  result = {"zeros": int(np.sum(a == 0)), "nonfinite": int(np.sum(~finite)), "size": int(a.size)}
  if exps.size == 0:
    return {"min_exponent": None, "counts": [], **result}
  lo, hi = int(exps.min()), int(exps.max())
  counts = np.bincount(exps - lo, minlength=hi - lo + 1)
  return {"min_exponent": lo, "counts": [int(c) for c in counts], **result}


def merge_histograms(hists: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The histogram of the concatenation of the arrays behind ``hists``."""
  total = np.zeros(2 * _EXP_OFFSET, np.int64)
  for h in hists:
    if h["min_exponent"] is not None:
      lo = h["min_exponent"] + _EXP_OFFSET
      total[lo : lo + len(h["counts"])] += h["counts"]
  rest = {k: sum(h[k] for h in hists) for k in ("zeros", "nonfinite", "size")}
  used = np.nonzero(total)[0]
  if used.size == 0:
    return {"min_exponent": None, "counts": [], **rest}
  lo, hi = int(used[0]), int(used[-1])
  return {"min_exponent": lo - _EXP_OFFSET, "counts": [int(c) for c in total[lo : hi + 1]], **rest}


def tensor_stats(x: Any, formats: Sequence[str] = tuple(FORMATS)) -> dict[str, Any]:
  """``{"hist": exponent_histogram(x), "formats": format_fractions(x)}``."""
  return {"hist": exponent_histogram(x), "formats": format_fractions(x, formats)}
