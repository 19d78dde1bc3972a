"""Semi-supervised SST-2: where masked-LM pre-training pays, as a learning curve.

For each labelled training-set size (250, 1,000, 4,000 sentences and all of
them; seed ``s`` draws the subsets, nested) and seed:

1. masked-LM pre-training of a BERT-style encoder, once per corpus and reused
   across sizes and seeds: in-domain (the labelled training sentences with
   their labels dropped) and out-of-domain (WikiText-2, or ``--data``);
2. fine-tuning each pre-trained encoder on the labelled subset
   (``train.init_from``: its backbone, a fresh pooler and classifier);
3. the same encoder trained on the subset alone (from scratch, with the
   in-domain run's tokenizer, so only the weights differ);
4. a bag-of-words logistic regression on the subset;
5. a linear probe: logistic regression on the frozen, mean-pooled features of
   each pre-trained backbone and of a randomly initialised one, which
   measures the representation alone (sizes below "all").

The curve runs in bf16; at one point (``Setting.precision_point`` labels,
in-domain pre-trained) fp32 and fp16 with dynamic loss scaling repeat the
fine-tuning from the same bf16-pre-trained backbone (its parameters are fp32).
Dev-set accuracy and macro-F1, mean and spread over seeds; a table
(``results.md``, ``results.json``) and a plot (``results.png``) in ``--out``.

  python -m experiments.finetune_classify                 # ~16 min of CPU on 2 cores
  python -m experiments.finetune_classify --fast          # a smoke test, about a minute of CPU

Labelled data: ``--train``/``--dev`` (.tsv/.csv/.jsonl with ``--text-field``
and ``--label-field``); default SST-2 at ``../shared/data/sst2/`` when present,
else (or with ``--builtin``) the built-in sentiment set. Measured figures are in docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from llm_mp import data
from llm_mp.classification import (
  bow_logistic_regression,
  classification_metrics,
  logistic_regression,
)
from llm_mp.config import apply_overrides
from llm_mp.data.tokenizer import TOKENIZER_FILE
from llm_mp.models import build_model
from llm_mp.models.encoder import pool
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.state import init_variables_fn
from llm_mp.train import train

SST2 = "../shared/data/sst2"
WIKITEXT2 = "../shared/data/wikitext2"
CURVE_PRECISION = "bf16"
PRECISIONS = {
  "fp32": ("fp32", "none"),
  "bf16": ("bf16", "none"),
  "fp16 + dynamic scale": ("fp16", "dynamic"),
}
IN_DOMAIN, OUT_OF_DOMAIN = "in-domain", "out-of-domain"


@dataclasses.dataclass(frozen=True)
class Setting:
  """How long and how big; ``--fast`` is the CI smoke setting."""

  pretrain_steps: int = 1000
  pretrain_lr: float = 2e-3
  sizes: tuple[int, ...] = (250, 1000, 4000, 0)  # labelled sentences; 0 = all of them
  finetune_steps: tuple[int, ...] = (60, 100, 200, 250)  # per size
  precision_point: int = 1000  # the size at which fp32 and fp16 repeat the in-domain run
  finetune_lr: float = 1e-3
  backbone_lr_scale: float = 1.0  # fine-tuning: lr multiplier of the pre-trained backbone
  mlm_probability: float = 0.15
  probe_l2s: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0)  # the probe's weight decays, by CV
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
  sizes=(64,),
  finetune_steps=(4,),
  precision_point=64,
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


def size_name(size: int) -> str:
  """A labelled-set size as the table writes it: ``1000`` -> ``"1,000"``, ``0`` -> ``"all"``."""
  return f"{size:,}" if size else "all"


def _common(setting: Setting, precision: str, seed: int, steps: int) -> list[str]:
  policy, scale = PRECISIONS[precision]
  return [
    *setting.model,
    f"precision.policy={policy}",
    f"precision.loss_scale={scale}",
    *common.quiet_run(steps, log_points=20),
    f"train.seed={seed}",
    f"data.seq_len={setting.seq_len}",
    f"train.batch_size={setting.batch_size}",
    "train.eval_batches=1000",
    f"optim.warmup_steps={max(steps // 10, 1)}",
  ]


def pretrain(
  out: str, name: str, setting: Setting, precision: str, paths: Sequence[str]
) -> dict[str, Any]:
  """Masked-LM pre-training on ``paths`` (() = the embedded corpus).

  Returns ``{"workdir", "val_loss"}``: the run directory and the masked-LM loss
  (nats per selected token) of its final evaluation.
  """
  workdir = os.path.join(out, f"pretrain_{name}_{common.slug(precision)}")
  ov = _common(setting, precision, 0, setting.pretrain_steps) + [
    f"optim.lr={setting.pretrain_lr}",
    f"train.mlm_probability={setting.mlm_probability}",
  ]
  config = apply_overrides(get_preset("encoder_tiny"), ov)
  config = dataclasses.replace(config, data=dataclasses.replace(config.data, paths=tuple(paths)))
  metrics = train(config, workdir, verbose=False)
  return {"workdir": workdir, "val_loss": metrics.get("val_loss")}


def classify_run(
  workdir: str,
  setting: Setting,
  precision: str,
  seed: int,
  steps: int,
  labelled: dict[str, Any],
  train_file: str,
  init_from: str | None,
  tokenizer_from: str,
) -> str:
  """Trains a classifier on ``train_file``: fine-tuned from ``init_from``, or from
  scratch (``None``) with the tokenizer of the run ``tokenizer_from``."""
  ov = _common(setting, precision, seed, steps) + [
    "train.task=classify",
    f"optim.lr={setting.finetune_lr}",
    f"model.n_classes={labelled['n_classes']}",
    # Mean pooling: MLM pre-training (no next-sentence task) does not train a [CLS] summary.
    "model.pool=mean",
    f"data.text_field={labelled['text_field']}",
    f"data.label_field={labelled['label_field']}",
  ]
  if init_from:
    ov += [f"train.init_from={init_from}", f"train.backbone_lr_scale={setting.backbone_lr_scale}"]
  else:  # a new run takes the tokenizer it finds in its directory
    os.makedirs(workdir, exist_ok=True)
    shutil.copy(os.path.join(tokenizer_from, TOKENIZER_FILE), workdir)
  config = apply_overrides(get_preset("encoder_tiny"), ov)
  config = dataclasses.replace(
    config,
    data=dataclasses.replace(config.data, paths=(train_file,), val_paths=(labelled["dev_file"],)),
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


def dev_accuracy(workdir: str, labelled: dict[str, Any], seq_len: int) -> dict[str, float]:
  """Accuracy and macro-F1 of a classification run on the validation texts,
  tokenised with the run's own tokenizer."""
  tokenizer = data.load_tokenizer(workdir)
  rows, _ = data.encode_labelled(labelled["dev_texts"], labelled["dev_labels"], tokenizer, seq_len)
  return classification_metrics(
    predict(workdir, rows), labelled["dev_labels"], labelled["n_classes"]
  )


def features(
  workdir: str,
  texts: Sequence[str],
  seq_len: int,
  random_seed: int | None = None,
  width_multiple: int = 16,
) -> np.ndarray:
  """Mean-pooled final hidden states ``float32[N, d]`` of a run's backbone (its latest
  checkpoint, or a fresh initialisation from ``random_seed``), nothing trained.

  Rows are sorted by length and each batch of 256 cut to its longest row, rounded up
  to ``width_multiple`` tokens (at most ``seq_len``): padding is masked out of
  attention and pooling, so the features equal those of full-length rows.
  """
  run = load_run(workdir)
  model = build_model(run.config.model, run.precision, head="hidden")
  if random_seed is None:
    params = run.params
  else:
    variables = init_variables_fn(model, run.config)(jax.random.PRNGKey(random_seed))
    params = jax.tree.map(lambda x: x.unbox(), variables["params"], is_leaf=_is_boxed)
  apply = jax.jit(
    lambda p, b: pool(
      model.apply({"params": p}, b["inputs"], b["segment_ids"], b["positions"]),
      b["segment_ids"],
      "mean",
    ).astype(jnp.float32)
  )
  rows, _ = data.encode_labelled(
    texts, np.zeros(len(texts), np.int32), data.load_tokenizer(workdir), seq_len
  )
  lengths = rows["segment_ids"].astype(bool).sum(1)
  order = np.argsort(lengths, kind="stable")
  out = np.empty((len(texts), run.config.model.d_model), np.float32)
  for i in range(0, len(texts), 256):
    idx = order[i : i + 256]
    width = min(seq_len, -(-int(lengths[idx].max()) // width_multiple) * width_multiple)
    batch = {k: jnp.asarray(rows[k][idx, :width]) for k in ("inputs", "segment_ids", "positions")}
    out[idx] = np.asarray(apply(params, batch))
  return out


def _is_boxed(x) -> bool:
  return hasattr(x, "unbox")


def probe(
  train_x: np.ndarray,
  train_y: np.ndarray,
  dev_x: np.ndarray,
  labelled: dict,
  l2s: Sequence[float],
  folds: int = 4,
) -> dict[str, float]:
  """A linear probe: logistic regression on standardised features (mean and scale
  of the training rows), its weight decay the one of ``l2s`` with the best
  ``folds``-fold cross-validated accuracy on the training rows. Returns accuracy and
  macro-F1 on the validation rows, and the ``l2`` chosen."""
  mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
  x, dev_x = (train_x - mean) / scale, (dev_x - mean) / scale
  n_classes = labelled["n_classes"]
  fold = np.arange(len(x)) % folds

  def cv_accuracy(l2: float) -> float:
    hits = [
      logistic_regression(x[fold != k], train_y[fold != k], x[fold == k], n_classes, l2=l2)
      == train_y[fold == k]
      for k in range(folds)
    ]
    return float(np.mean(np.concatenate(hits)))

  l2 = max(l2s, key=cv_accuracy)  # the first of equals: l2s from weak to strong
  pred = logistic_regression(x, train_y, dev_x, n_classes, l2=l2)
  return {**classification_metrics(pred, labelled["dev_labels"], n_classes), "l2": l2}


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
    "texts": texts,
    "labels": np.asarray(labels),
    "dev_texts": dev_texts,
    "dev_labels": np.asarray(dev_labels),
    "n_classes": len(names),
    "names": names,
    "source": source,
    "text_field": args.text_field,
    "label_field": args.label_field,
  }


def _write_tsv(path: str, labelled: dict[str, Any], texts, labels) -> str:
  """``texts`` with their class names as a .tsv with the run's field names."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{labelled['text_field']}\t{labelled['label_field']}\n")
    for text, label in zip(texts, labels):
      f.write(f"{' '.join(text.split())}\t{labelled['names'][label]}\n")
  return path


def subset(labelled: dict[str, Any], size: int, seed: int) -> np.ndarray:
  """Indices of the ``size`` labelled training examples of ``seed`` (0: all); the
  subsets of one seed are nested (the first ``size`` of one permutation)."""
  order = np.random.default_rng(seed).permutation(len(labelled["texts"]))
  return order[:size] if size else order


def _summary(scores: list[dict[str, float]]) -> dict[str, Any]:
  summary: dict[str, Any] = {
    m: common.mean_sd([s[m] for s in scores]) for m in ("accuracy", "macro_f1")
  }
  return {**summary, "per_seed": scores}


def run(args) -> dict[str, Any]:
  """Runs the whole study; returns the results dict written to results.json."""
  setting = FAST if args.fast else Setting()
  labelled = _labelled(args)
  out = args.out
  files = os.path.join(out, "labelled")
  os.makedirs(files, exist_ok=True)
  labelled["dev_file"] = _write_tsv(
    os.path.join(files, "dev.tsv"), labelled, labelled["dev_texts"], labelled["dev_labels"]
  )
  unlabelled = os.path.join(files, "unlabelled.txt")
  with open(unlabelled, "w", encoding="utf-8") as f:
    f.write("\n".join(" ".join(t.split()) for t in labelled["texts"]) + "\n")
  outside = (
    args.data if args.data is not None else ([WIKITEXT2] if os.path.isdir(WIKITEXT2) else [])
  )
  corpora = {IN_DOMAIN: [unlabelled], OUT_OF_DOMAIN: outside}
  t0 = time.perf_counter()
  results: dict[str, Any] = {
    "labelled": labelled["source"],
    "pretrain_data": {
      IN_DOMAIN: "the labelled training texts, labels dropped",
      OUT_OF_DOMAIN: ", ".join(outside) or "embedded corpus",
    },
    "setting": dataclasses.asdict(setting),
    "seeds": args.seeds,
    "n_train": len(labelled["texts"]),
    "pretrain": {},
    "curve": {},
    "probe": {},
    "precision": {},
  }
  sources = {}
  for corpus, paths in corpora.items():
    sources[corpus] = pretrain(out, corpus, setting, CURVE_PRECISION, paths)
    results["pretrain"][f"{corpus}, {CURVE_PRECISION}"] = sources[corpus]["val_loss"]
  tokenizer_from = sources[IN_DOMAIN]["workdir"]
  probe_sizes = [s for s in setting.sizes if s]
  feats = {}
  if probe_sizes:
    needed = sorted(
      {int(i) for s in range(args.seeds) for i in subset(labelled, max(probe_sizes), s)}
    )
    texts = [labelled["texts"][i] for i in needed] + list(labelled["dev_texts"])
    where = {i: k for k, i in enumerate(needed)}
    for backbone, (workdir, random_seed) in {
      "random backbone": (tokenizer_from, 0),
      **{f"{c} MLM": (sources[c]["workdir"], None) for c in corpora},
    }.items():
      x = features(workdir, texts, setting.seq_len, random_seed)
      feats[backbone] = (x[: len(needed)], x[len(needed) :], where)
  for size, steps in zip(setting.sizes, setting.finetune_steps):
    scores: dict[str, list] = {}
    for seed in range(args.seeds):
      idx = subset(labelled, size, seed)
      texts, labels = [labelled["texts"][i] for i in idx], labelled["labels"][idx]
      train_file = _write_tsv(
        os.path.join(files, f"n{size}_seed{seed}.tsv"), labelled, texts, labels
      )
      pred = bow_logistic_regression(texts, labels, labelled["dev_texts"], labelled["n_classes"])
      scores.setdefault("bag-of-words", []).append(
        classification_metrics(pred, labelled["dev_labels"], labelled["n_classes"])
      )
      for mode, init in (
        ("from scratch", None),
        *((f"pre-trained, {c}", sources[c]["workdir"]) for c in corpora),
      ):
        workdir = os.path.join(out, f"{common.slug(mode)}_n{size}_seed{seed}")
        classify_run(
          workdir,
          setting,
          CURVE_PRECISION,
          seed,
          steps,
          labelled,
          train_file,
          init,
          tokenizer_from,
        )
        scores.setdefault(mode, []).append(dev_accuracy(workdir, labelled, setting.seq_len))
      if size:
        for backbone, (train_x, dev_x, where) in feats.items():
          rows = [where[int(i)] for i in idx]
          scores.setdefault(f"probe, {backbone}", []).append(
            probe(train_x[rows], labels, dev_x, labelled, setting.probe_l2s)
          )
    row = {mode: _summary(s) for mode, s in scores.items()}
    results["curve"][size_name(size)] = row
    print(
      f"{size_name(size)} labels: "
      + ", ".join(f"{m} {r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.3f}" for m, r in row.items()),
      flush=True,
    )
  point = setting.precision_point
  steps = dict(zip(setting.sizes, setting.finetune_steps))[point]
  results["precision"][CURVE_PRECISION] = results["curve"][size_name(point)][
    f"pre-trained, {IN_DOMAIN}"
  ]
  for precision in args.precisions:
    if precision == CURVE_PRECISION:
      continue
    scores = []
    for seed in range(args.seeds):
      workdir = os.path.join(out, f"precision_{common.slug(precision)}_n{point}_seed{seed}")
      train_file = os.path.join(files, f"n{point}_seed{seed}.tsv")
      source = sources[IN_DOMAIN]["workdir"]
      classify_run(workdir, setting, precision, seed, steps, labelled, train_file, source, "")
      scores.append(dev_accuracy(workdir, labelled, setting.seq_len))
    results["precision"][precision] = _summary(scores)
    print(
      f"{precision} at {size_name(point)} labels: {results['precision'][precision]}", flush=True
    )
  results["seconds"] = round(time.perf_counter() - t0, 1)
  return results


def _cell(r: dict[str, Any] | None) -> str:
  return f"{r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.3f}" if r else "–"


def table(results: dict[str, Any]) -> str:
  """The Markdown tables of ``results``: the learning curve (dev accuracy), then the
  precision point."""
  modes = list(dict.fromkeys(m for row in results["curve"].values() for m in row))
  lines = [
    "| labelled sentences | " + " | ".join(modes) + " |",
    "|---|" + "---|" * len(modes),
  ]
  for size, row in results["curve"].items():
    lines.append(f"| {size} | " + " | ".join(_cell(row.get(m)) for m in modes) + " |")
  point = size_name(results["setting"]["precision_point"])
  lines += [
    "",
    f"| precision (pre-trained, {IN_DOMAIN}, {point} labels) | dev accuracy | dev macro-F1 |",
    "|---|---|---|",
  ]
  for precision, r in results["precision"].items():
    (f1, f1_sd) = r["macro_f1"]
    lines.append(f"| {precision} | {_cell(r)} | {f1:.3f} ± {f1_sd:.3f} |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Dev accuracy against labelled-set size (mean, spread as error bars) per model."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  sizes = results["setting"]["sizes"]
  n_all = results["n_train"]
  xs = {size_name(s): (s or n_all) for s in sizes}
  modes = list(dict.fromkeys(m for row in results["curve"].values() for m in row))
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for mode in modes:
    points = [(xs[k], row[mode]["accuracy"]) for k, row in results["curve"].items() if mode in row]
    ax.errorbar(
      [p[0] for p in points],
      [p[1][0] for p in points],
      yerr=[p[1][1] for p in points],
      capsize=3,
      marker="o",
      ms=3,
      ls="--" if mode.startswith("probe") else "-",
      label=mode,
    )
  ax.set_xscale("log")
  ax.set(
    xlabel="labelled training sentences",
    ylabel="dev accuracy",
    title=f"{results['labelled']}: mean ± sd over {results['seeds']} seeds",
  )
  ax.title.set_fontsize(8)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.finetune_classify", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--data",
    nargs="*",
    default=None,
    help="out-of-domain pre-training text (default: ../shared/data/wikitext2/ when present, "
    "else the embedded corpus)",
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
  parser.add_argument(
    "--precisions",
    nargs="*",
    default=list(PRECISIONS),
    choices=list(PRECISIONS),
    help=f"precisions at the precision point (the curve is {CURVE_PRECISION})",
  )
  parser.add_argument("--seeds", type=int, default=3)
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
