"""Host-side metrics: JSONL and TensorBoard writers, progress bar, FLOP arithmetic."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping

import numpy as np

from llm_mp.config import ModelConfig


def flops_per_token(model: ModelConfig, seq_len: int, n_params_no_pos: int) -> float:
  """Training FLOPs per token, the PaLM/nanoGPT formula the reference uses.

  ``6 N + 12 L H Q T``: 6 FLOPs per parameter (forward + backward) plus the
  attention score and value matmuls; ``N`` excludes position embeddings.
  """
  return 6.0 * n_params_no_pos + 12.0 * model.n_layers * model.n_heads * model.head_dim * seq_len


def params_without_positions(params: Any) -> int:
  """Parameter count without the learned position table (as in the MFU formula)."""
  import jax  # pylint: disable=import-outside-toplevel

  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if "pos_embedding" not in jax.tree_util.keystr(path):
      total += int(np.prod(leaf.shape))
  return total


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device scalars -> plain floats/ints/bools for JSON; strings pass through; vectors (e.g. the MoE
  per-expert load) -> lists of floats."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, str):
      out[k] = v
      continue
    v = np.asarray(v)
    if v.ndim:
      out[k] = [float(x) for x in v.reshape(-1)]
    elif v.dtype == np.bool_:
      out[k] = bool(v)
    elif np.issubdtype(v.dtype, np.integer):
      out[k] = int(v)
    else:
      out[k] = float(v)
  return out


class MetricsWriter:
  """Appends one JSON object per call to ``workdir/metrics.jsonl`` and mirrors
  scalars (and strings, as text) to TensorBoard event files under
  ``workdir/tensorboard``.

  Only process 0 writes (pass ``enabled=False`` elsewhere). ``purge_step``:
  TensorBoard drops events at and after it that an earlier, interrupted run
  wrote (a resumed run writes them again).
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    tensorboard: bool = True,
    purge_step: int | None = None,
  ):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **to_python(metrics)}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, str):
          self._tb.add_text(k, v, int(step))
          continue
        values = enumerate(v) if isinstance(v, list) else [(None, v)]
        for i, x in values:  # a vector becomes scalars "name/0", "name/1", ...
          if k != "step" and isinstance(x, (int, float)) and math.isfinite(x):
            self._tb.add_scalar(k if i is None else f"{k}/{i}", x, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl`` (for plots and tests).

  A line that is not a JSON object (e.g. cut short by a kill mid-write) is
  skipped with a ``UserWarning`` naming the file and line.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict):
        warnings.warn(f"{path}:{lineno}: not a JSON object, skipped", stacklevel=2)
        continue
      records.append(record)
  return records


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps only the whole, valid records of ``workdir/metrics.jsonl`` with
  ``"step" <= step`` (the step a resumed run restarts after), so each step
  appears once and a line cut short by a kill cannot swallow the next one."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    raw = f.read()
  kept = []
  for line in raw.split(b"\n")[:-1]:  # the part after the last newline is a partial line
    try:
      record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line + b"\n")
  text = b"".join(kept)
  if text == raw:
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(text)
  os.replace(tmp, path)


def progress_bar(total: int, initial: int, enabled: bool = True):
  """A tqdm bar over optimizer steps (disabled off process 0)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(
    total=total,
    initial=initial,
    disable=not enabled,
    unit="step",
    dynamic_ncols=True,
    smoothing=0.1,
  )


def bar_postfix(m: Mapping[str, Any], loss_scaled: bool = True) -> str:
  """The progress bar's text: loss, tokens/s, the loss scale (when ``loss_scaled``: a
  run without loss scaling has none to show), skipped steps."""
  parts = [f"loss {m['loss']:.4f}"]
  if "tokens_per_s" in m:
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
  if loss_scaled and "loss_scale" in m:
    parts.append(f"scale {m['loss_scale']:g}")
  if m.get("skipped_steps"):
    parts.append(f"skipped {m['skipped_steps']}")
  return ", ".join(parts)
