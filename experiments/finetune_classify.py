"""Pre-train an encoder with masked LM, fine-tune it on SST-2, compare precisions.

For each precision (fp32, bf16, fp16 + dynamic loss scaling) and seed:

1. pre-train a BERT-style encoder with masked LM on unlabelled text (the
   embedded corpus, or ``--data``), once per precision;
2. fine-tune it on the labelled training set (``train.init_from``: the
   backbone from step 1, a fresh classification head);
3. train the same encoder on the labelled set only (from scratch);

and, once, a bag-of-words logistic regression as the yardstick. Accuracy and
macro-F1 on the validation set; mean and spread over seeds; a table
(``results.md``, ``results.json``) and a plot (``results.png``) in ``--out``.

  python -m experiments.finetune_classify                 # ~15 min on 2 CPU cores
  python -m experiments.finetune_classify --data ../shared/data/wikitext2/
  python -m experiments.finetune_classify --fast          # a smoke test, seconds

Labelled data: ``--train``/``--dev`` (.tsv/.csv/.jsonl with ``--text-field``
and ``--label-field``); default SST-2 at ``../shared/data/sst2/`` when present,
else (or with ``--builtin``) the built-in sentiment set. Measured figures are in docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from llm_mp import data
from llm_mp.classification import bow_logistic_regression, classification_metrics
from llm_mp.config import apply_overrides
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.train import train

SST2 = "../shared/data/sst2"
PRECISIONS = {
  "fp32": ("fp32", "none"),
  "bf16": ("bf16", "none"),
  "fp16 + dynamic scale": ("fp16", "dynamic"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """How long and how big; ``--fast`` is the CI smoke setting."""

  pretrain_steps: int = 500
  finetune_steps: int = 400
  seq_len: int = 64  # BPE tokens: covers SST-2's sentences (bytes would cut half of them)
  batch_size: int = 32
  model: tuple[str, ...] = (
    "model.d_model=128",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.tokenizer=bpe",
    "data.bpe_vocab_size=2048",
    "model.vocab_size=2048",
    "model.vocab_multiple=1",
  )


FAST = Setting(
  pretrain_steps=4,
  finetune_steps=4,
  seq_len=32,
  batch_size=8,
  model=(
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "data.tokenizer=bpe",
    "data.bpe_vocab_size=512",
    "model.vocab_size=512",
    "model.vocab_multiple=1",
  ),
)


def _common(setting: Setting, precision: str, scale: str, seed: int, steps: int) -> list[str]:
  return [
    *setting.model,
    f"precision.policy={precision}",
    f"precision.loss_scale={scale}",
    *common.quiet_run(steps, log_points=20),
    f"train.seed={seed}",
    f"data.seq_len={setting.seq_len}",
    f"train.batch_size={setting.batch_size}",
    "train.eval_batches=1000",
    f"optim.warmup_steps={max(steps // 10, 1)}",
  ]


def pretrain(out: str, setting: Setting, precision: str, scale: str, paths: Sequence[str]) -> str:
  """Masked-LM pre-training; returns the run directory."""
  workdir = os.path.join(out, f"pretrain_{precision}")
  ov = _common(setting, precision, scale, 0, setting.pretrain_steps) + ["optim.lr=1e-3"]
  config = apply_overrides(get_preset("encoder_tiny"), ov)
  if paths:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, paths=tuple(paths)))
  train(config, workdir, verbose=False)
  return workdir


def classify_run(
  out: str,
  name: str,
  setting: Setting,
  precision: str,
  scale: str,
  seed: int,
  labelled: dict[str, Any],
  init_from: str | None,
) -> str:
  """Trains a classifier (fine-tuned from ``init_from``, or from scratch)."""
  workdir = os.path.join(out, name)
  ov = _common(setting, precision, scale, seed, setting.finetune_steps) + [
    "train.task=classify",
    "optim.lr=1e-3",
    f"model.n_classes={labelled['n_classes']}",
    # Mean pooling: MLM pre-training (no next-sentence task) does not train a [CLS] summary.
    "model.pool=mean",
    f"data.text_field={labelled['text_field']}",
    f"data.label_field={labelled['label_field']}",
  ]
  if init_from:
    ov.append(f"train.init_from={init_from}")
  config = apply_overrides(get_preset("encoder_tiny"), ov)
  config = dataclasses.replace(
    config,
    data=dataclasses.replace(
      config.data, paths=tuple(labelled["train"]), val_paths=tuple(labelled["dev"])
    ),
  )
  train(config, workdir, verbose=False)
  return workdir


def predict(workdir: str, rows: data.ExampleRows, batch_size: int = 64) -> np.ndarray:
  """Class predictions ``int32[N]`` of a classification run's latest checkpoint."""
  run = load_run(workdir)
  apply = jax.jit(
    lambda p, b: jnp.argmax(
      run.model.apply({"params": p}, b["inputs"], b["segment_ids"], b["positions"]), -1
    )
  )
  out = []
  for i in range(0, len(rows), batch_size):
    batch = rows.gather(np.arange(i, i + batch_size))
    out.append(np.asarray(apply(run.params, {k: jnp.asarray(v) for k, v in batch.items()})))
  return np.concatenate(out)[: len(rows)]


def dev_rows(
  workdir: str, labelled: dict[str, Any], seq_len: int
) -> tuple[data.ExampleRows, np.ndarray]:
  """The validation rows, tokenised with the run's own tokenizer."""
  tokenizer = data.load_tokenizer(workdir)
  texts, labels = labelled["dev_texts"], labelled["dev_labels"]
  rows, _ = data.encode_labelled(texts, labels, tokenizer, seq_len)
  return rows, labels


def _labelled(args) -> dict[str, Any]:
  train_paths, dev_paths = args.train, args.dev
  if not train_paths and not args.builtin and os.path.isdir(SST2):
    train_paths, dev_paths = [f"{SST2}/train.tsv"], [f"{SST2}/dev.tsv"]
  if train_paths:
    texts, labels, names, _ = data.read_labelled(train_paths, args.text_field, args.label_field)
    dev_texts, dev_labels, _, _ = data.read_labelled(
      dev_paths, args.text_field, args.label_field, labels=names
    )
    source = ", ".join(train_paths)
  else:
    texts, labels, names = data.builtin_labelled("train")
    dev_texts, dev_labels, _ = data.builtin_labelled("dev")
    source = "built-in sentiment set"
  return {
    "train": train_paths,
    "dev": dev_paths,
    "texts": texts,
    "labels": labels,
    "dev_texts": dev_texts,
    "dev_labels": dev_labels,
    "n_classes": len(names),
    "names": names,
    "source": source,
    "text_field": args.text_field,
    "label_field": args.label_field,
  }


def run(args) -> dict[str, Any]:
  """Runs the whole study; returns the results dict written to results.json."""
  setting = FAST if args.fast else Setting()
  labelled = _labelled(args)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  bow = bow_logistic_regression(
    labelled["texts"], labelled["labels"], labelled["dev_texts"], labelled["n_classes"]
  )
  results: dict[str, Any] = {
    "labelled": labelled["source"],
    "pretrain_data": args.data or "embedded corpus",
    "setting": dataclasses.asdict(setting),
    "seeds": args.seeds,
    "bow": classification_metrics(bow, labelled["dev_labels"], labelled["n_classes"]),
    "runs": {},
  }
  print(f"bag-of-words baseline: {results['bow']}", flush=True)
  for pname in args.precisions:
    precision, scale = PRECISIONS[pname]
    source = pretrain(args.out, setting, precision, scale, args.data)
    for mode in ("fine-tuned", "from scratch"):
      scores = []
      for seed in range(args.seeds):
        name = f"{'ft' if mode == 'fine-tuned' else 'scratch'}_{precision}_seed{seed}"
        workdir = classify_run(
          args.out,
          name,
          setting,
          precision,
          scale,
          seed,
          labelled,
          source if mode == "fine-tuned" else None,
        )
        rows, gold = dev_rows(workdir, labelled, setting.seq_len)
        scores.append(classification_metrics(predict(workdir, rows), gold, labelled["n_classes"]))
      key = f"{pname}, {mode}"
      results["runs"][key] = {
        m: common.mean_sd([s[m] for s in scores]) for m in ("accuracy", "macro_f1")
      }
      results["runs"][key]["per_seed"] = scores
      print(f"{key}: {results['runs'][key]}", flush=True)
  results["seconds"] = round(time.perf_counter() - t0, 1)
  return results


def table(results: dict[str, Any]) -> str:
  """The Markdown table of ``results``."""
  lines = ["| model | precision | dev accuracy | dev macro-F1 |", "|---|---|---|---|"]
  bow = results["bow"]
  lines.append(
    f"| bag-of-words logistic regression | fp64 | {bow['accuracy']:.3f} | {bow['macro_f1']:.3f} |"
  )
  for key, r in results["runs"].items():
    precision, mode = key.split(", ")
    (acc, acc_sd), (f1, f1_sd) = r["accuracy"], r["macro_f1"]
    lines.append(
      f"| encoder, {mode} | {precision} | {acc:.3f} ± {acc_sd:.3f} | {f1:.3f} ± {f1_sd:.3f} |"
    )
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Bar chart of dev accuracy (mean, spread as error bars) per run kind."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = list(results["runs"])
  means = [results["runs"][n]["accuracy"][0] for n in names]
  spreads = [results["runs"][n]["accuracy"][1] for n in names]
  fig, ax = plt.subplots(figsize=(9, 4))
  ax.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue")
  ax.axhline(results["bow"]["accuracy"], color="tab:red", ls="--", label="bag-of-words")
  ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
  ax.set(
    ylabel="dev accuracy",
    ylim=(0.4, 1.0),
    title=f"{results['labelled']}: mean ± sd over {results['seeds']} seeds",
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.finetune_classify", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--data",
    nargs="*",
    default=[],
    help="unlabelled pre-training text (default: the embedded corpus)",
  )
  parser.add_argument("--train", nargs="*", default=[], help="labelled training files")
  parser.add_argument("--dev", nargs="*", default=[], help="labelled validation files")
  parser.add_argument(
    "--builtin",
    action="store_true",
    help="use the built-in sentiment set even where SST-2 is present",
  )
  parser.add_argument("--text-field", default="sentence")
  parser.add_argument("--label-field", default="label")
  parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--out", default="runs/finetune_classify")
  parser.add_argument("--fast", action="store_true", help="tiny model, a few steps (CI)")
  args = parser.parse_args(argv)
  if bool(args.train) != bool(args.dev):
    parser.error("--train and --dev go together")
  results = run(args)
  md = table(results)
  common.write_results(args.out, results, md, {**vars(args), "setting": results["setting"]})
  try:
    plot(results, os.path.join(args.out, "results.png"))
  except ImportError:
    print("matplotlib not installed (pip install llm_mp[plots]): no plot")
  print(md)
  print(f"total {results['seconds']} s; written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
