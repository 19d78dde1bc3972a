"""Fine-tune an imported Hugging Face checkpoint on your text in bf16 and fp16; compare.

1. ``import-hf``: a GPT-2 or LLaMA-family directory in the Hugging Face layout
   becomes an llm_mp run (config, tokenizer, step-0 checkpoint);
2. its perplexity on the evaluation text, before fine-tuning;
3. fine-tuning on the training text (``train.init_from``) under each precision;
4. perplexity after, and an export of each fine-tuned run back to the HF layout.

  python -m experiments.finetune_pretrained                       # the tiny GPT-2 test fixture
  python -m experiments.finetune_pretrained --src /path/to/gpt2   # a real GPT-2 124M directory
  python -m experiments.finetune_pretrained --fast                # seconds

Default data: WikiText-2 at ``../shared/data/wikitext2/`` (fine-tune on
``valid.txt``, evaluate on ``test.txt``), else the embedded corpus split.
Writes ``results.json`` and ``results.md`` to ``--out``; measured figures are in
docs/huggingface.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Sequence

from experiments import common
from llm_mp import hf
from llm_mp.config import apply_overrides
from llm_mp.inference import evaluate_run
from llm_mp.rundir import stored_config, write_run
from llm_mp.train import train

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf", "gpt2")
WIKITEXT = "../shared/data/wikitext2"
PRECISIONS = ("fp32", "bf16", "fp16")


def run(args) -> dict[str, Any]:
  """Imports, evaluates, fine-tunes under each precision, evaluates, exports."""
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  base = os.path.join(args.out, "imported")
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    config, params, tokenizer = hf.import_hf(args.src)
    write_run(base, config, params, tokenizer)
  train_text, eval_text = args.train, args.eval
  if not train_text and os.path.isdir(WIKITEXT):
    train_text, eval_text = [f"{WIKITEXT}/valid.txt"], [f"{WIKITEXT}/test.txt"]
  results: dict[str, Any] = {
    "src": args.src,
    "train": train_text or "embedded corpus",
    "eval": eval_text or "embedded corpus (validation split)",
    "steps": args.steps,
    "runs": {},
  }
  results["before"] = evaluate_run(base, eval_text or None)
  print(f"before fine-tuning: {results['before']}", flush=True)
  source = stored_config(base)
  for precision in args.precisions:
    workdir = os.path.join(args.out, f"finetuned_{precision}")
    config = apply_overrides(
      source,
      [
        f"precision.policy={precision}",
        *common.quiet_run(args.steps, log_points=10),
        f"train.init_from={os.path.abspath(base)}",
        f"optim.lr={args.lr}",
        f"optim.warmup_steps={max(args.steps // 10, 1)}",
        f"train.batch_size={args.batch_size}",
      ],
    )
    config = dataclasses.replace(
      config,
      data=dataclasses.replace(config.data, paths=tuple(os.path.abspath(p) for p in train_text)),
    )
    last = train(config, workdir, verbose=False)
    after = evaluate_run(workdir, eval_text or None)
    hf.export_hf(workdir, os.path.join(args.out, f"export_{precision}"))
    results["runs"][precision] = {
      "after": after,
      "train_loss": last.get("loss"),
      "skipped_steps": last.get("skipped_steps"),
    }
    print(f"{precision}: {results['runs'][precision]}", flush=True)
  results["seconds"] = round(time.perf_counter() - t0, 1)
  return results


def table(results: dict[str, Any]) -> str:
  """Markdown: evaluation perplexity before and after fine-tuning, per precision."""
  b = results["before"]
  lines = [
    "| model | precision | eval loss | eval perplexity | skipped steps |",
    "|---|---|---|---|---|",
    f"| imported, not fine-tuned | fp32 | {b['val_loss']:.4f} | {b['val_ppl']:.2f} | - |",
  ]
  for precision, r in results["runs"].items():
    a = r["after"]
    lines.append(
      f"| fine-tuned {results['steps']} steps | {precision} | {a['val_loss']:.4f} | "
      f"{a['val_ppl']:.2f} | {r['skipped_steps']} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.finetune_pretrained", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--src", default=FIXTURE, help="HF checkpoint directory")
  parser.add_argument("--train", nargs="*", default=[], help="fine-tuning text files")
  parser.add_argument("--eval", nargs="*", default=[], help="evaluation text files")
  parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--out", default="runs/finetune_pretrained")
  parser.add_argument("--fast", action="store_true", help="a few steps (CI)")
  args = parser.parse_args(argv)
  if args.fast:
    args.steps = 3
  results = run(args)
  md = table(results)
  common.write_results(args.out, results, md, vars(args))
  print(md)
  print(f"total {results['seconds']} s; written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
