"""What the experiments share: the overrides of a run they only read back, the
mean and spread over seeds, a setting's name as a directory name, and the
results they write (``results.json`` and ``results.md``: the table and the
settings the experiment ran with).
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Mapping, Sequence

# The --fast setting (CI) of the experiments on the embedded corpus: 3 layers (a format
# leaves the first and last block in the policy's precision, so the middle one takes it),
# 32-token rows, 200 documents, 1% of the text held out (evaluating a run reads about 50
# validation batches, not 250).
FAST_LM = (
  "model.n_layers=3",
  "model.d_model=32",
  "model.n_heads=2",
  "model.n_kv_heads=1",
  "model.max_len=32",
  "data.seq_len=32",
  "train.batch_size=8",
  "data.max_docs=200",
  "data.val_fraction=0.01",
)


def slug(name: str) -> str:
  """A setting's name as a directory name: ``"fp16, no scaling"`` -> ``"fp16__no_scaling"``."""
  return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the sample standard deviation (0 for a single value) of per-seed results."""
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def quiet_run(steps: int, log_points: int = 30) -> list[str]:
  """Overrides for a run that an experiment reads back afterwards: ``steps`` updates,
  metrics logged about ``log_points`` times, one evaluation and one checkpoint at
  the end, no text samples."""
  return [
    f"train.steps={steps}",
    f"train.log_every={max(steps // log_points, 1)}",
    f"train.eval_every={steps}",
    f"train.ckpt_every={steps}",
    "train.sample_tokens=0",
  ]


def data_paths(paths: Sequence[str]) -> list[str]:
  """The ``data.paths`` override for text files given on the command line (absolute,
  so run directories elsewhere find them); none when ``paths`` is empty."""
  return [f"data.paths={','.join(os.path.abspath(p) for p in paths)}"] if paths else []


def settings_markdown(settings: Mapping[str, Any]) -> str:
  """``settings`` as a Markdown list, each value as JSON: ``- `steps`: 300``."""
  return "\n".join(
    f"- `{k}`: {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in settings.items()
  )


def write_results(
  out: str, results: Mapping[str, Any], table: str, settings: Mapping[str, Any]
) -> None:
  """Writes ``out/results.json`` (``results`` with ``settings`` under "settings") and
  ``out/results.md`` (``table``, then the settings as a list).

  ``settings``: what the experiment ran with, e.g. its parsed command line after
  ``--fast`` and the overrides it applied, so a table can be reproduced from its file.
  """
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({**results, "settings": dict(settings)}, f, indent=1, ensure_ascii=False, default=str)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"{table}\n\nSettings:\n\n{settings_markdown(settings)}\n")
