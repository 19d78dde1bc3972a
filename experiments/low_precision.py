"""Below 16 bits: fp8, int8, bf16 optimizer state, weight-only int8/int4 and low rank, compared.

Trains the same model on the same data with the same seed under each training
setting (:data:`SETTINGS`: bf16 as the reference, fp8 with delayed and with
current scaling, int8 quantisation-aware training, pure bf16 with bf16 Adam
moments and stochastic rounding), then applies the post-training conversions
to the bf16 run: weight-only int8 and int4 (``llm-mp quantize``) and truncated
SVD at several ranks (``llm-mp lowrank``). Reports per row the final training
loss, the validation loss and perplexity, training tokens/s (on a CPU every
sub-16-bit format is emulated, so its speed says nothing about hardware that
has it), bytes per parameter (params + optimizer state), the checkpoint size
and the parameter count. Writes ``results.json``, ``results.md`` and
``low_precision.png`` to ``--out``.

  python -m experiments.low_precision                  # the tiny preset, embedded corpus
  python -m experiments.low_precision --data ../shared/data/wikitext2/
  python -m experiments.low_precision --fast           # seconds (CI)

The reading of the measured results is in docs/low_precision.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Sequence

import jax

from experiments import common
from llm_mp.config import apply_overrides
from llm_mp.inference import evaluate_run
from llm_mp.lowrank_convert import svd_sweep
from llm_mp.metrics import read_metrics
from llm_mp.presets import get_preset
from llm_mp.quantize import quantize_run
from llm_mp.train import train

REFERENCE = "bf16"
SETTINGS = {  # name -> overrides
  REFERENCE: ("precision.policy=bf16",),
  "fp8, delayed scaling": (
    "precision.policy=bf16",
    "precision.formats=fp8",
    "precision.fp8_scaling=delayed",
  ),
  "fp8, current scaling": (
    "precision.policy=bf16",
    "precision.formats=fp8",
    "precision.fp8_scaling=current",
  ),
  "int8 QAT": ("precision.policy=bf16", "precision.formats=int8"),
  "pure bf16, bf16 moments, stochastic rounding": (
    "precision.policy=pure_bf16",
    "optim.state_dtype=bf16",
    "optim.stochastic_rounding=true",
  ),
}
PTQ = ("int8", "int4")
RANKS = (64, 32, 16, 8)


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def train_setting(name: str, steps: int, out: str, data: Sequence[str], overrides: Sequence[str]):
  """Trains one setting; returns (its workdir, its metrics records)."""
  ov = [
    *SETTINGS[name],
    *common.quiet_run(steps),
    "train.keep_checkpoints=1",
    "train.eval_batches=16",
    *overrides,
    *common.data_paths(data),
  ]
  workdir = os.path.join(out, common.slug(name))
  train(apply_overrides(get_preset("tiny"), ov), workdir, verbose=False)
  return workdir, read_metrics(workdir)


def summarise_run(workdir: str, records: list[dict]) -> dict[str, Any]:
  """The final training loss, the loss and perplexity on the whole validation split (as
  for the converted runs), median tokens/s (the first record, which includes
  compiling, left out), bytes per parameter and checkpoint bytes of a trained run."""
  last = records[-1]
  speeds = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]
  evaluation = evaluate_run(workdir)
  return {
    "loss": last["loss"],
    "val_loss": evaluation["val_loss"],
    "perplexity": evaluation["val_ppl"],
    "tokens_per_s": statistics.median(speeds) if speeds else None,
    "bytes_per_param": last.get("bytes_per_param"),
    "checkpoint_bytes": _directory_bytes(os.path.join(workdir, "checkpoints")),
  }


def post_training(reference: str, out: str, ranks: Sequence[int]) -> dict[str, dict[str, Any]]:
  """Weight-only int8/int4 and truncated-SVD conversions of the reference run."""
  rows = {}
  for to in PTQ:
    q = quantize_run(reference, to, os.path.join(out, f"{common.slug(REFERENCE)}-{to}"))
    after = evaluate_run(q["out"])
    rows[f"{REFERENCE} -> weight-only {to}"] = {
      "val_loss": after["val_loss"],
      "perplexity": after["val_ppl"],
      "checkpoint_bytes": q["checkpoint_bytes"],
      "quantized_tensor_ratio": q["sizes"]["ratio"],
    }
  dense, *factored = svd_sweep(reference, ranks)
  for row in factored:
    rows[
      f"{REFERENCE} -> SVD rank {row['rank']} ({row['params'] / dense['params']:.0%} params)"
    ] = {
      "val_loss": row["val_loss"],
      "perplexity": row["perplexity"],
      "params": row["params"],
    }
  return rows


def markdown(results: dict[str, Any]) -> str:
  """The results table: trained settings, then post-training conversions."""
  num = lambda v, f: "-" if v is None else f.format(v)
  speed = "tokens/s" + (" (emulated)" if results["device"] == "cpu" else "")
  lines = [
    f"| setting | train loss | val loss | perplexity | {speed} | bytes/param | checkpoint |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in {**results["trained"], **results["converted"]}.items():
    size = r.get("checkpoint_bytes")
    lines.append(
      f"| {name} | {num(r.get('loss'), '{:.4f}')} | {r['val_loss']:.4f} | "
      f"{r['perplexity']:.3f} | {num(r.get('tokens_per_s'), '{:,.0f}')} | "
      f"{num(r.get('bytes_per_param'), '{:.1f}')} | "
      f"{num(None if size is None else size / 2**20, '{:.2f} MiB')} |"
    )
  return "\n".join(lines)


def plot(curves: dict[str, list[dict]], results: dict[str, Any], out: str) -> None:
  """``low_precision.png``: training loss per setting, and validation perplexity of every
  row against its checkpoint size (or parameter count for the SVD ranks)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
  for name, records in curves.items():
    left.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
  left.set(xlabel="step", ylabel="training loss (nats/token)", title="Training")
  left.legend(fontsize=7)
  names = list(results["trained"]) + list(results["converted"])
  rows = [{**results["trained"], **results["converted"]}[n] for n in names]
  right.barh(range(len(names)), [r["perplexity"] for r in rows], color="tab:blue")
  right.set_yticks(range(len(names)), names, fontsize=7)
  right.invert_yaxis()
  ref = results["trained"][REFERENCE]["perplexity"]
  right.axvline(ref, color="k", lw=0.8, ls="--")
  right.set(xlabel="validation perplexity (dashed: bf16)", title="Every setting")
  lo = min(r["perplexity"] for r in rows)
  right.set_xlim(lo * 0.97, max(r["perplexity"] for r in rows) * 1.01)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "low_precision.png"), dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.low_precision", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument(
    "--settings",
    nargs="+",
    default=list(SETTINGS),
    choices=list(SETTINGS),
    metavar="NAME",
    help=f"training settings to run (the {REFERENCE!r} reference always runs): "
    f"{', '.join(SETTINGS)}",
  )
  parser.add_argument(
    "--ranks", type=int, nargs="+", default=list(RANKS), help="SVD ranks to convert to"
  )
  parser.add_argument("--data", nargs="*", default=[], help="text files (default: embedded)")
  parser.add_argument("--out", default="runs/low_precision", help="runs, table and figure")
  parser.add_argument("--fast", action="store_true", help="3 steps of a 3-layer model (CI)")
  parser.add_argument("overrides", nargs="*", metavar="section.field=value")
  args = parser.parse_args(argv)
  overrides = list(args.overrides)
  if args.fast:
    args.steps, args.ranks = 3, [4]
    overrides = [*common.FAST_LM, *overrides]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  curves, trained = {}, {}
  for name in [REFERENCE, *(n for n in SETTINGS if n in args.settings and n != REFERENCE)]:
    workdir, curves[name] = train_setting(name, args.steps, args.out, args.data, overrides)
    trained[name] = summarise_run(workdir, curves[name])
    print(f"{name}: {trained[name]}", flush=True)
  reference = os.path.join(args.out, common.slug(REFERENCE))
  results = {
    "device": jax.default_backend(),
    "steps": args.steps,
    "overrides": overrides,
    "trained": trained,
    "converted": post_training(reference, args.out, args.ranks),
  }
  results["seconds"] = round(time.perf_counter() - t0, 1)
  md = markdown(results)
  common.write_results(args.out, results, md, {**vars(args), "overrides": overrides})
  try:
    plot(curves, results, args.out)
  except ImportError:
    print("matplotlib not installed (pip install llm_mp[plots]): no figure")
  print(md)
  print(f"total {results['seconds']} s; written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
