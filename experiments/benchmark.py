"""Train-step throughput tables: llm_mp presets against the PyTorch reference.

Each suite times a list of (preset, precision, overrides) with
:func:`llm_mp.benchmark.run` (one fixed batch, llm_mp's own train step; see that
module for what is measured) and, when torch and ``../shared/bench/torch_gpt.py``
are present, runs the reference in the same job; it prints each run's JSON, then
the Markdown table of docs/benchmarks.md (tokens/s relative to the reference).

  python -m experiments.benchmark --suite gpu   # 124M bf16/fp16/fp32, 350M bf16, 1B bf16: < 8 min
  python -m experiments.benchmark --suite cpu   # nanogpt_cpu fp32, tiny fp32/bf16 on 2 cores
  python -m experiments.benchmark --preset nanogpt_cpu --precision fp32   # one run = llm-mp bench

Expected: on an H100, bf16 >= 1.15x the torch.compile reference tokens/s;
on 2 CPU cores, nanogpt_cpu fp32 at least as fast as torch eager (see
docs/benchmarks.md for measured figures, dates and commands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

import jax

from llm_mp import benchmark
from llm_mp.allocator import tune_malloc

# name -> (preset, precision, overrides); the tables of docs/benchmarks.md.
SUITES = {
  "gpu": [
    ("gpt2_124m", "bf16", ()),
    ("gpt2_124m", "fp16", ()),
    ("gpt2_124m", "fp32", ()),
    ("gpt2_350m", "bf16", ()),
    ("llama_1b", "bf16", ("model.remat=dots",)),
  ],
  "cpu": [("nanogpt_cpu", "fp32", ()), ("tiny", "fp32", ()), ("tiny", "bf16", ())],
}
REFERENCE = "../shared/bench/torch_gpt.py"  # the PyTorch reference, where present
REFERENCE_ARGS = {
  "gpu": ("--precision", "bf16", "--compile"),
  "cpu": (
    "--device",
    "cpu",
    "--no-compile",
    "--precision",
    "fp32",
    "--n_layer",
    "4",
    "--n_head",
    "4",
    "--n_embd",
    "128",
    "--block",
    "64",
    "--vocab",
    "65",
    "--batch",
    "12",
  ),
}


def run_reference(suite: str, path: str = REFERENCE) -> dict | None:
  """The PyTorch reference's JSON (its last output line), or None without torch or the script."""
  try:
    import torch  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return None
  if not os.path.isfile(path):
    return None
  out = subprocess.run(
    [sys.executable, path, *REFERENCE_ARGS[suite]], capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def suite_table(suite: str, steps: int, warmup: int, reference: str = REFERENCE) -> str:
  """Runs a suite and returns its Markdown table (tokens/s relative to the
  reference when it ran in the same job)."""
  rows, results = [], []
  ref = run_reference(suite, reference)
  if ref is not None:
    print(f"reference: {ref['tokens_per_s']:,.0f} tokens/s", flush=True)
  for preset, precision, overrides in SUITES[suite]:
    r = benchmark.run(preset, precision, overrides, steps, warmup)
    print(json.dumps(r), flush=True)
    results.append(r)
    ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
    mfu = f"{r['mfu_spec']:.1%}" if r["mfu_spec"] else "-"
    rows.append(
      f"| llm_mp {preset} {precision} {' '.join(overrides)} | {r['ms_per_step']:.1f} | "
      f"{r['tokens_per_s']:,.0f} | {ratio} | {mfu} | {r['init_s']:.1f} | "
      f"{r['compile_s']:.1f} |"
    )
  head = [
    "| run | ms/step | tokens/s | vs reference | MFU (spec) | init s | compile s |",
    "|---|---|---|---|---|---|---|",
  ]
  if ref:
    head.append(
      f"| reference {' '.join(REFERENCE_ARGS[suite])} | {ref['ms_per_step']:.1f} | "
      f"{ref['tokens_per_s']:,.0f} | 1.00 | - | - | - |"
    )
  device = results[0]["device"] if results else "?"
  return "\n".join([f"device: {device}, jax {jax.__version__}", "", *head, *rows])


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments.benchmark``: a suite's table, or one run as ``llm-mp bench``."""
  tune_malloc()
  parser = benchmark.make_parser("python -m experiments.benchmark")
  parser.add_argument(
    "--suite",
    choices=sorted(SUITES),
    help="run a whole table (with the PyTorch reference when torch and "
    f"{REFERENCE} are present) and print it as Markdown",
  )
  parser.add_argument("--reference", default=REFERENCE, help="path of torch_gpt.py")
  args = parser.parse_args(argv)
  if args.suite:
    print(suite_table(args.suite, args.steps, args.warmup, args.reference))
  else:
    print(json.dumps(benchmark.run_args(args)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
