"""Text-to-text with the encoder-decoder: translation, summarisation, question answering.

Trains ``seq2seq_tiny`` (or ``--preset``) on one task under each precision, decodes the
test split with beam search, scores it with the task's metric next to a baseline computed in
the same run, prints sample outputs beside their references and writes a results table.

  python -m experiments.seq2seq --task translate              # Multi30k de-en, BLEU
  python -m experiments.seq2seq --task summarize              # BBC News Summary, ROUGE, lead-3
  python -m experiments.seq2seq --task qa                     # SQuAD v1.1 dev, EM / F1
  python -m experiments.seq2seq --task translate --fast       # seconds, 1+1 layers (CI)

Data: ``../shared/data`` (``--root``), with the fixed splits of
``experiments/datasets.py``. Baselines: translation copies the source (BLEU of the German
sentence against the English reference); summarisation takes the article's first three
sentences (lead-3) and, beside it, its first sentence alone; question answering returns the
context sentence sharing most words with the question. Writes ``results.json`` and
``results.md`` to ``--out``.

With ``--pretrain-steps N`` (the summarize setting's default: see ``SETTINGS``) a first fp32
run learns to copy: it restores chunks of the training and validation inputs whose word
spans are masked (:func:`llm_mp.data.text2text.denoising_pairs`; the test split is never
read), and each precision's run fine-tunes from it with its tokenizer (``train.init_from``).

With ``--no-repeat-ngram N`` (the summarize setting's default: 4; 0 = off) no decoded
hypothesis repeats an N-gram of its own tokens (``generate_seq2seq``'s
``no_repeat_ngram_size``): the summaries repeated their phrases, and blocking 4-grams raised
ROUGE-1 from 29.65 to 31.92 (docs/seq2seq.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from experiments import common, datasets
from llm_mp import text_metrics
from llm_mp.config import apply_overrides
from llm_mp.data import text2text
from llm_mp.generate import generate_seq2seq
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.train import train

PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "fp16 + dynamic scale": "fp16"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """Per-task CPU settings: row length, steps, vocabulary, decoding length."""

  seq_len: int  # source tokens per row
  steps: int
  vocab: int
  max_new_tokens: int
  eval_examples: int  # test examples decoded (the first ones of the fixed split)
  target_len: int | None = None  # target tokens per row (None: seq_len)
  overrides: tuple[str, ...] = ()  # config overrides of this task, before the command line's
  pretrain_steps: int = 0  # denoising pre-training on the training inputs first (0: none)
  no_repeat_ngram: int = 0  # beam search never repeats an n-gram of its output (0: off)


SETTINGS = {
  "translate": Setting(seq_len=48, steps=1500, vocab=4000, max_new_tokens=40, eval_examples=1000),
  "summarize": Setting(  # dropout 0: 0.19 nats lower validation loss (docs/seq2seq.md)
    seq_len=192,
    target_len=64,
    steps=600,
    vocab=4000,
    max_new_tokens=64,
    eval_examples=100,
    overrides=("model.dropout=0.0",),
    pretrain_steps=3000,  # denoising pre-training: the model reads (docs/seq2seq.md)
    no_repeat_ngram=4,  # the outputs repeated their phrases: ROUGE-1 +2.3 (docs/seq2seq.md)
  ),
  "qa": Setting(
    seq_len=256, target_len=16, steps=400, vocab=4000, max_new_tokens=16, eval_examples=300
  ),
}
FAST = Setting(  # one encoder and one decoder layer (the preset: 2 + 2): a third less CPU
  seq_len=32,
  steps=3,
  vocab=300,
  max_new_tokens=8,
  eval_examples=8,
  overrides=("model.n_layers=1", "model.n_decoder_layers=1"),
)
MASK_FRACTION = 0.15  # of the words of a pre-training chunk, in spans of 3 on average


def _write_jsonl(path: str, split: text2text.TaskSplit) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for x, y in zip(split.inputs, split.targets):
      f.write(json.dumps({"input": x, "target": y}, ensure_ascii=False) + "\n")


def baselines(task: str, split: text2text.TaskSplit) -> dict[str, list[str]]:
  """Each model-free baseline's outputs for ``split``, by name; the first is the task's
  baseline (see the module docstring), summaries also get the article's first sentence."""
  if task == "translate":
    return {"copy the source": list(split.inputs)}
  if task == "summarize":
    lead3 = [text_metrics.lead3(x, skip_title=True) for x in split.inputs]
    return {"lead-3": lead3, "first sentence": [text_metrics.sentences(x)[0] for x in lead3]}
  out = []
  for x in split.inputs:  # "question: ... context: ..."
    question, _, context = x.partition(" context: ")
    words = set(re.findall(r"\w+", question.lower())) - {"what", "the", "of", "a", "in", "is"}
    sentences = text_metrics.sentences(context) or [context]
    out.append(max(sentences, key=lambda s: len(words & set(re.findall(r"\w+", s.lower())))))
  return {"best-overlap sentence": out}


def score(task: str, hyps: list[str], split: text2text.TaskSplit) -> dict[str, float]:
  """The task's metric(s), in percent; summaries also get ROUGE-2 against another
  article's reference and the paired-minus-shuffled difference (what the output owes
  to its own article: :func:`llm_mp.text_metrics.rouge_paired_minus_shuffled`)."""
  if task == "translate":
    return {"bleu": text_metrics.bleu(hyps, [r[0] for r in split.references])}
  if task == "summarize":  # and the test of reading: ROUGE-2 paired minus shuffled
    refs = [r[0] for r in split.references]
    reading = text_metrics.rouge_paired_minus_shuffled(hyps, refs)
    return {
      **text_metrics.rouge(hyps, refs),
      "rouge2_shuffled": reading["shuffled"],
      "rouge2_reading": reading["difference"],
    }
  return text_metrics.squad_em_f1(hyps, split.references)


def decode(
  workdir: str,
  inputs: list[str],
  setting: Setting,
  beam: int,
  no_repeat_ngram: int = 0,
  batch_size: int = 32,
) -> list[str]:
  """Beam-search outputs of a trained run for ``inputs``, as text; ``no_repeat_ngram``
  n >= 1: no output repeats one of its n-grams (0: off)."""
  run = load_run(workdir)
  tok = run.tokenizer
  out = []
  for i in range(0, len(inputs), batch_size):
    chunk = inputs[i : i + batch_size]
    rows = np.full((batch_size, setting.seq_len), tok.pad_id, np.int32)
    for j, ids in enumerate(tok.encode_batch(chunk)):
      ids = (ids + [tok.eos_id])[: setting.seq_len]
      rows[j, : len(ids)] = ids
    tokens = generate_seq2seq(
      run.config.model,
      run.precision,
      run.params,
      jnp.asarray(rows),
      jnp.asarray((rows != tok.pad_id).astype(np.int32)),
      max_new_tokens=setting.max_new_tokens,
      bos_id=tok.bos_id,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
      beam_size=beam,
      no_repeat_ngram_size=no_repeat_ngram,
    )
    for row in np.asarray(tokens)[: len(chunk)]:
      ids = row.tolist()
      ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
      out.append(tok.decode(ids).strip())
  return out


def _config(
  preset: str,
  setting: Setting,
  policy: str,
  steps: int,
  paths: dict[str, str],
  lengths: tuple[int, int | None],
  extra: Sequence[str] = (),
):
  """The config of one training run: ``steps`` updates under ``policy`` on the pairs at
  ``paths`` (train, validation), ``(source, target)`` token rows ``lengths``, then the
  overrides of the task and ``extra``."""
  config = apply_overrides(
    get_preset(preset),
    [
      f"precision.policy={policy}",
      *common.quiet_run(steps, log_points=20),
      f"data.seq_len={lengths[0]}",
      f"data.target_len={lengths[1]}",
      f"model.max_len={max(setting.seq_len, 64)}",
      "data.tokenizer=bpe",
      f"data.bpe_vocab_size={setting.vocab}",
      f"model.vocab_size={setting.vocab}",
      "train.eval_batches=20",
      "train.batch_size=32",
      f"optim.warmup_steps={max(steps // 20, 1)}",
      *setting.overrides,
      *extra,
    ],
  )
  return dataclasses.replace(
    config,
    data=dataclasses.replace(
      config.data, paths=(paths["train"],), val_paths=(paths["validation"],)
    ),
  )


def pretrain(
  args, setting: Setting, steps: int, splits: dict[str, text2text.TaskSplit]
) -> tuple[str, dict[str, Any]]:
  """Denoising pre-training (fp32, ``steps`` updates) on the training and validation
  inputs (never the test split's): chunks of ``T // 2`` words, ``T`` the target row
  length (about ``0.8 T`` tokens, so the clean chunk fits a row), with
  :data:`MASK_FRACTION` of their words masked
  (:func:`llm_mp.data.text2text.denoising_pairs`); source and target rows of ``T``
  tokens. Of the command line's overrides it takes the model's (the fine-tuning runs'
  architecture must be its own). Returns the run directory, whose tokenizer the
  fine-tuning runs use, and its last metrics."""
  target_len = setting.target_len or setting.seq_len
  paths = {}
  for seed, name in enumerate(("train", "validation")):
    pairs = text2text.denoising_pairs(
      splits[name].inputs, target_len // 2, MASK_FRACTION, seed=seed
    )
    paths[name] = os.path.join(args.out, "data", f"denoise_{name}.jsonl")
    _write_jsonl(paths[name], pairs)
  workdir = os.path.join(args.out, "pretrain")
  model = [o for o in args.overrides if o.startswith("model.")]
  config = _config(args.preset, setting, "fp32", steps, paths, (target_len, target_len), model)
  return workdir, train(config, workdir, verbose=False)


def run(args) -> dict[str, Any]:
  """Trains and evaluates every precision; returns the results."""
  setting = FAST if args.fast else SETTINGS[args.task]
  no_repeat = setting.no_repeat_ngram if args.no_repeat_ngram is None else args.no_repeat_ngram
  os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
  t0 = time.perf_counter()
  splits = {
    s: datasets.load_task_data(args.task, s, args.root) for s in ("train", "validation", "test")
  }
  if args.fast:
    splits = {k: text2text.TaskSplit(*(x[:64] for x in v)) for k, v in splits.items()}
  test = text2text.TaskSplit(*(x[: setting.eval_examples] for x in splits["test"]))
  paths = {}
  for name in ("train", "validation"):
    paths[name] = os.path.join(args.out, "data", f"{name}.jsonl")
    _write_jsonl(paths[name], splits[name])
  results: dict[str, Any] = {
    "task": args.task,
    "setting": dataclasses.asdict(setting),
    "preset": args.preset,
    "beam": args.beam,
    "no_repeat_ngram": no_repeat,
    "test_examples": len(test.inputs),
    "baselines": {
      name: score(args.task, hyps, test) for name, hyps in baselines(args.task, test).items()
    },
    "runs": {},
  }
  results["baseline"] = next(iter(results["baselines"].values()))  # the task's baseline
  print(f"baselines: {results['baselines']}", flush=True)
  steps = setting.pretrain_steps if args.pretrain_steps is None else args.pretrain_steps
  source = None
  if steps:
    source, last = pretrain(args, setting, steps, splits)
    results["pretrain"] = {"steps": steps, "val_loss": last.get("val_loss")}
    print(f"denoising pre-training: {results['pretrain']}", flush=True)
  for name in args.precisions:
    workdir = os.path.join(args.out, name.split(" ")[0])
    config = _config(
      args.preset,
      setting,
      PRECISIONS[name],
      setting.steps,
      paths,
      (setting.seq_len, setting.target_len),
      [*([f"train.init_from={source}"] if source else []), *args.overrides],
    )
    last = train(config, workdir, verbose=False)
    hyps = decode(workdir, test.inputs, setting, args.beam, no_repeat)
    results["runs"][name] = {
      "metric": score(args.task, hyps, test),
      "val_loss": last.get("val_loss"),
      "train_loss": last.get("loss"),
      "skipped_steps": last.get("skipped_steps"),
      "samples": [
        {"input": x[:300], "output": h, "reference": r[0]}
        for x, h, r in zip(test.inputs[:3], hyps[:3], test.references[:3])
      ],
    }
    print(f"{name}: {results['runs'][name]['metric']}", flush=True)
    for s in results["runs"][name]["samples"]:
      print(f"  output:    {s['output']}\n  reference: {s['reference']}", flush=True)
  results["seconds"] = round(time.perf_counter() - t0, 1)
  return results


def table(results: dict[str, Any]) -> str:
  """Markdown: the metric of each precision and of each baseline."""
  names = list(results["baseline"])
  lines = [
    "| model | precision | " + " | ".join(names) + " | val loss |",
    "|---|---|" + "---|" * (len(names) + 1),
  ]
  for baseline, metric in results["baselines"].items():
    lines.append(f"| {baseline} | - | " + " | ".join(f"{metric[n]:.2f}" for n in names) + " | - |")
  for precision, r in results["runs"].items():
    lines.append(
      f"| {results['preset']} | {precision} | "
      + " | ".join(f"{r['metric'][n]:.2f}" for n in names)
      + f" | {r['val_loss']:.4f} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.seq2seq", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--task", required=True, choices=datasets.TASKS)
  parser.add_argument("--preset", default="seq2seq_tiny")
  parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--root", default=datasets.DEFAULT_ROOT, help="the data directory")
  parser.add_argument("--out", default=None, help="default runs/seq2seq_<task>")
  parser.add_argument(
    "--fast", action="store_true", help="64 examples, 3 steps, one layer each side (CI)"
  )
  parser.add_argument(
    "--pretrain-steps",
    type=int,
    default=None,
    help="denoising pre-training steps on the training inputs before fine-tuning (0: none; "
    "default: the task's setting)",
  )
  parser.add_argument(
    "--no-repeat-ngram",
    type=int,
    default=None,
    metavar="N",
    help="N >= 1: no decoded output repeats one of its N-grams (0: off; default: the task's "
    "setting)",
  )
  parser.add_argument("overrides", nargs="*", metavar="section.field=value")
  args = parser.parse_args(argv)
  args.out = args.out or os.path.join("runs", f"seq2seq_{args.task}")
  results = run(args)
  md = table(results)
  common.write_results(args.out, results, md, {**vars(args), "setting": results["setting"]})
  print(md)
  print(f"total {results['seconds']} s; written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
