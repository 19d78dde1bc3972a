"""The numerics report on disk: ``diagnose.json`` and the gradient-exponent figure.

:func:`plot_gradient_exponents` draws the 2018 mixed-precision paper's figure from a
report of :func:`llm_mp.numerics.diagnose` (or ``diagnose_run``); :func:`write_report`
writes the report and, when matplotlib is installed, the figure beside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_mp.format_ranges import FORMATS, format_range

_PLOT_HINT = (
  "matplotlib is not installed: the figure needs the plots extra "
  "(pip install 'llm_mp[plots]' or pip install -e '.[plots]')"
)


def _bars(hist: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  if hist["min_exponent"] is None:
    return np.zeros(0), np.zeros(0)
  counts = np.asarray(hist["counts"], np.float64)
  return hist["min_exponent"] + np.arange(counts.size), counts / max(hist["size"], 1)


def plot_gradient_exponents(
  report: Mapping[str, Any], path: str, kind: str = "activation_gradients"
) -> str:
  """The 2018 paper's figure: the exponent histogram of ``kind`` (unscaled
  and scaled by the report's loss scale) over the fp16 / bf16 / fp8 ranges.

  Each format is a band: light = subnormal exponents, dark = normal ones;
  values left of a band flush to zero, right of it overflow. The arrow is the
  loss scale's shift, ``log2 S`` binades to the right.

  Returns:
    ``path`` (a PNG is written there).

  Raises:
    ImportError: matplotlib is missing (the message says how to install it).
  """
  try:
    # A Figure of its own (no pyplot): the caller's backend (a notebook's inline
    # plots) is left as it was.
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_PLOT_HINT) from e
  scale = float(report["loss_scale"])
  totals = report["totals"]
  fig = Figure(figsize=(9, 5.5))
  ax, bands = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
  x0, y0 = _bars(totals[f"{kind}_unscaled"]["hist"])
  x1, y1 = _bars(totals[kind]["hist"])
  ax.bar(x0, y0, width=1.0, color="0.6", alpha=0.7, label="gradients of the loss")
  if scale != 1.0:
    ax.bar(
      x1,
      y1,
      width=1.0,
      color="tab:blue",
      alpha=0.6,
      label=f"gradients of loss x {scale:g} (loss scale)",
    )
  ax.set_yscale("log")
  ax.set_ylabel("fraction of values")
  zeros = totals[kind]["hist"]["zeros"] / max(totals[kind]["hist"]["size"], 1)
  ax.set_title(
    f"{kind.replace('_', ' ')} exponents (precision {report.get('precision')}, "
    f"{zeros:.1%} exactly zero)"
  )
  if scale != 1.0 and y0.size:
    peak = float(x0[np.argmax(y0)])
    top = float(np.max(y0))
    ax.annotate(
      "",
      xy=(peak + math.log2(scale), top),
      xytext=(peak, top),
      arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 2},
    )
    ax.text(
      peak + math.log2(scale) / 2,
      top * 0.45,
      f"x{scale:g} = +{math.log2(scale):g}",
      color="tab:red",
      ha="center",
    )
  ax.legend(loc="upper left", fontsize=8)
  for i, name in enumerate(FORMATS):
    r = format_range(name)
    lo, normal, hi = r.exponents
    bands.broken_barh([(lo - 0.5, normal - lo)], (i - 0.4, 0.8), color="tab:orange", alpha=0.35)
    bands.broken_barh(
      [(normal - 0.5, hi - normal + 1)], (i - 0.4, 0.8), color="tab:green", alpha=0.6
    )
    if scale != 1.0:  # values of the unscaled loss that the scale lifts into the band
      bands.plot([lo - 0.5 - math.log2(scale)] * 2, [i - 0.45, i + 0.45], "--", color="tab:red")
  bands.set_yticks(range(len(FORMATS)), list(FORMATS))
  bands.set_xlabel(
    "floor(log2 |value|)   (bands: light = subnormal, dark = normal; "
    "red dashes: smallest unscaled value kept)"
  )
  lo_all = min([*x0[:1], *x1[:1], -40]) - 2
  bands.set_xlim(lo_all, 20)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_report(
  report: Mapping[str, Any], out_dir: str, name: str = "diagnose"
) -> dict[str, str | None]:
  """Writes ``<name>.json`` and, when matplotlib is installed, ``<name>.png``.

  Returns:
    ``{"json": path, "png": path or None, "note": why the PNG is missing or None}``.
  """
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f"{name}.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, sort_keys=True)
  try:
    png = plot_gradient_exponents(report, os.path.join(out_dir, f"{name}.png"))
    return {"json": json_path, "png": png, "note": None}
  except ImportError as e:
    return {"json": json_path, "png": None, "note": str(e)}
