"""``llm-mp`` / ``python -m llm_mp``: train, generate, eval, predict, quantize, lowrank,
diagnose, config, bench, import-hf, export-hf.

Every user error (bad path, unknown preset or key, conflicting workdir, a
prompt too long) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence

from llm_mp.allocator import tune_malloc
from llm_mp.cli_config import OVERRIDE, resolve_config
from llm_mp.config import Config
from llm_mp.presets import PRESETS, get_preset


def _load(workdir: str):
  from llm_mp.rundir import load_run  # pylint: disable=import-outside-toplevel

  return load_run(workdir)


def cmd_train(args: argparse.Namespace) -> int:
  from llm_mp.train import train  # pylint: disable=import-outside-toplevel

  config = resolve_config(args)
  last = train(config, args.workdir)
  print(json.dumps({k: v for k, v in last.items()}, sort_keys=True))
  return 130 if "interrupted" in last else 0


def cmd_generate(args: argparse.Namespace) -> int:
  from llm_mp import generate as gen  # pylint: disable=import-outside-toplevel
  from llm_mp.data import load_text2text_tokenizers  # pylint: disable=import-outside-toplevel
  from llm_mp.models import FAMILIES  # pylint: disable=import-outside-toplevel

  loaded = _load(args.workdir)
  model = loaded.config.model
  seq2seq = FAMILIES[model.family].reads_source
  wanted, other = ("source", "prompt") if seq2seq else ("prompt", "source")
  if getattr(args, wanted) is None or getattr(args, other) is not None:
    raise ValueError(
      f"{args.workdir} is a model.family={model.family!r} run: pass --{wanted} TEXT"
      + (f", not --{other}" if getattr(args, other) is not None else "")
    )
  if args.no_repeat_ngram and not seq2seq:
    raise ValueError(f"--no-repeat-ngram={args.no_repeat_ngram} is for --source runs")
  temperature = args.temperature
  if temperature is None:  # sampling continues a decoder's text; translation and beams are greedy
    temperature = 0.0 if seq2seq or args.beam_size > 1 else 0.8
  search = dict(
    seed=args.seed,
    temperature=temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    beam_size=args.beam_size,
    length_penalty=args.length_penalty,
  )
  n = args.max_new_tokens
  if seq2seq:
    source_tokenizer, target_tokenizer = load_text2text_tokenizers(args.workdir)
    text = gen.generate_seq2seq_text(
      model,
      loaded.precision,
      loaded.params,
      source_tokenizer,
      target_tokenizer,
      args.source,
      max_new_tokens=min(200, model.max_len) if n is None else n,
      no_repeat_ngram_size=args.no_repeat_ngram,
      **search,
    )
    print(text)
    return 0
  if n is None:  # fill the context, which the prompt's tokens (bos included) share
    prompt_len = len(gen.encode_prompt(loaded.tokenizer, args.prompt))
    n = min(200, model.max_len - prompt_len)
    if n < 1:
      raise ValueError(
        f"the prompt is {prompt_len} tokens, which leaves no room in "
        f"the model's context of model.max_len={model.max_len}; shorten it"
      )
  text = gen.generate_text(
    model,
    loaded.precision,
    loaded.params,
    loaded.tokenizer,
    args.prompt,
    max_new_tokens=n,
    **search,
  )
  print(args.prompt + text)
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  from llm_mp import inference  # pylint: disable=import-outside-toplevel

  print(json.dumps(inference.evaluate_run(args.workdir, args.data or None), sort_keys=True))
  return 0


def cmd_predict(args: argparse.Namespace) -> int:
  from llm_mp.inference import predict_run  # pylint: disable=import-outside-toplevel

  texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin]
  for text, out in zip(texts, predict_run(args.workdir, texts)):
    print(json.dumps({"input": text, "prediction": out}, ensure_ascii=False))
  return 0


def cmd_quantize(args: argparse.Namespace) -> int:
  from llm_mp.quantize import quantize_run  # pylint: disable=import-outside-toplevel

  report = quantize_run(args.workdir, args.to, args.out, evaluate=args.eval)
  print(json.dumps(report, sort_keys=True))
  return 0


def cmd_config(args: argparse.Namespace) -> int:
  from llm_mp.config_docs import describe  # pylint: disable=import-outside-toplevel

  print(describe(get_preset(args.preset) if args.preset else Config()))
  return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
  from llm_mp import hf, rundir  # pylint: disable=import-outside-toplevel

  rundir.check_new_directory(args.workdir)
  config, params, tokenizer = hf.import_hf(args.src, vocab_multiple=args.vocab_multiple)
  rundir.write_run(args.workdir, config, params, tokenizer)
  print(f"{hf.describe(config)}; wrote {args.workdir} (checkpoint at step 0)")
  return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
  from llm_mp import hf, rundir  # pylint: disable=import-outside-toplevel

  rundir.check_new_directory(args.out)
  hf.export_hf(args.workdir, args.out)
  print(f"wrote {args.out}")
  return 0


def cmd_lowrank(args: argparse.Namespace) -> int:
  from llm_mp import lowrank_convert  # pylint: disable=import-outside-toplevel

  report = lowrank_convert.convert_run(args.workdir, args.rank, args.out, evaluate=args.eval)
  print(json.dumps(report, sort_keys=True))
  return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
  from llm_mp import numerics, numerics_plot  # pylint: disable=import-outside-toplevel

  policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
  report = numerics.diagnose_run(
    args.workdir,
    loss_scale=args.loss_scale,
    batch_size=args.batch_size,
    precision=args.precision,
    policies=policies,
  )
  written = numerics_plot.write_report(report, args.out or args.workdir)
  print("\n".join(numerics.summary_lines(report)))
  if written["note"]:
    print(f"llm-mp diagnose: {written['note']}; wrote only {written['json']}", file=sys.stderr)
  print(json.dumps({k: v for k, v in written.items() if k != "note"}, sort_keys=True))
  return 0


def cmd_bench(args: argparse.Namespace) -> int:
  from llm_mp import benchmark  # pylint: disable=import-outside-toplevel

  return benchmark.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
  from llm_mp.tasks import task_names  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
    prog="llm-mp", description="Train, sample and evaluate Transformer LMs in mixed precision."
  )
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
    "train",
    help="train (or resume) a run in --workdir",
    description="Train a model; re-running on the same --workdir resumes.",
    epilog="`llm-mp config [--preset NAME]` lists every config field with its "
    "type, value and meaning.",
  )
  p.add_argument("--workdir", required=True, help="run directory (config, checkpoints, metrics)")
  p.add_argument(
    "--preset",
    metavar="NAME",
    help=f"named config: {', '.join(sorted(PRESETS))} (default: the workdir's, else tiny)",
  )
  p.add_argument("--precision", help="fp32, bf16, fp16, pure_bf16, or a policy 'p=f32,c=bf16'")
  p.add_argument(
    "--data",
    nargs="+",
    metavar="PATH",
    help="text files or directories (.txt/.jsonl); default: the embedded corpus",
  )
  p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2")
  p.add_argument("--steps", type=int, help="shorthand for train.steps=N")
  p.add_argument(
    "--task",
    choices=task_names(),
    help="training objective (default: lm for decoders, mlm for encoders, seq2seq for "
    "encoder-decoders); classify reads labelled .tsv/.csv/.jsonl (data.text_field, "
    "data.label_field, data.val_paths); seq2seq reads input/target .jsonl or two aligned files",
  )
  p.add_argument(
    "--init-from",
    metavar="RUN",
    help="fine-tune: start from RUN's latest parameters (backbone) and tokenizer",
  )
  p.add_argument(
    "--teacher",
    metavar="RUN",
    help="with --task distill: learn from RUN's outputs too (train.distill_weight, "
    "train.distill_temperature); a new run takes its tokenizer",
  )
  p.add_argument(
    "overrides",
    nargs="*",
    metavar="section.field=value",
    help="config overrides, e.g. model.n_layers=6 optim.lr=3e-4",
  )
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser(
    "generate", help="continue a prompt (decoder run) or map a source text (encoder-decoder run)"
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default=None, help="the text a decoder-only run continues")
  p.add_argument("--source", default=None, help="the input of an encoder-decoder run")
  p.add_argument(
    "--max-new-tokens",
    type=int,
    default=None,
    help="tokens to add (default: up to the model's context, at most 200)",
  )
  p.add_argument(
    "--temperature",
    type=float,
    default=None,
    help="0 = greedy (default: 0.8 for --prompt, 0 for --source and beam search)",
  )
  p.add_argument("--beam-size", type=int, default=1, help="> 1: beam search (temperature 0)")
  p.add_argument(
    "--length-penalty", type=float, default=0.6, help="beam search's GNMT alpha (0: log p alone)"
  )
  p.add_argument(
    "--no-repeat-ngram",
    type=int,
    default=0,
    metavar="N",
    help="--source runs: no output repeats one of its N-grams (0: off)",
  )
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("eval", help="validation loss and perplexity of a trained run, as JSON")
  p.add_argument("--workdir", required=True)
  p.add_argument(
    "--data",
    nargs="+",
    metavar="PATH",
    help="evaluate on these files instead of the run's validation split",
  )
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser(
    "predict",
    help="the run's task prediction for each text, as JSON lines",
    description="Print one JSON object per input text with the trained run's prediction: "
    "a continuation (lm), a label (classify), an output text (seq2seq), a reconstruction "
    "(mlm), or what a registered task predicts.",
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("texts", nargs="*", metavar="TEXT", help="inputs (default: one per stdin line)")
  p.set_defaults(fn=cmd_predict)

  p = sub.add_parser(
    "quantize",
    help="a trained run -> a weight-only int8/int4 run for eval and generate (sizes as JSON)",
    description="Write a copy of a run whose matmul weights (all but the first and last "
    "block and the heads, unless precision.format_edges) are stored as int8 or int4 with "
    "scales (precision.formats=int8-weight / int4-weight), with a params-only checkpoint.",
  )
  p.add_argument("--workdir", required=True, help="trained run directory")
  p.add_argument("--to", required=True, choices=("int8", "int4"), help="integer width")
  p.add_argument("--out", metavar="DIR", help="new run directory (default: WORKDIR-int8/-int4)")
  p.add_argument(
    "--eval",
    action="store_true",
    help="also evaluate both runs on the validation split (perplexity before and after)",
  )
  p.set_defaults(fn=cmd_quantize)

  p = sub.add_parser("config", help="list every config field: type, value, meaning (Markdown)")
  p.add_argument(
    "--preset",
    metavar="NAME",
    help=f"show this preset's values: {', '.join(sorted(PRESETS))} (default: the field defaults)",
  )
  p.set_defaults(fn=cmd_config)

  p = sub.add_parser(
    "import-hf",
    help="a Hugging Face GPT-2/LLaMA-family checkpoint -> a run",
    description="Write a run directory (config, tokenizer, step-0 checkpoint) "
    "from a Hugging Face checkpoint directory (or hub name).",
  )
  p.add_argument("src", help="directory with config.json, *.safetensors, tokenizer.json")
  p.add_argument("--workdir", required=True, help="new run directory to write")
  p.add_argument(
    "--vocab-multiple",
    type=int,
    default=1,
    metavar="N",
    help="pad the vocabulary to a multiple of N (e.g. 128); padded logits are "
    "masked, so loss and sampling are unchanged",
  )
  p.set_defaults(fn=cmd_import_hf)

  p = sub.add_parser("export-hf", help="a run's latest checkpoint -> a Hugging Face directory")
  p.add_argument("--workdir", required=True, help="run directory (GPT-2 or LLaMA shaped)")
  p.add_argument("out", help="new directory for config.json, model.safetensors, tokenizer.json")
  p.set_defaults(fn=cmd_export_hf)

  p = sub.add_parser(
    "lowrank",
    help="a trained run -> a run with rank-R factorised matmuls (truncated SVD)",
    description="Write a new run whose config names precision.formats=lowrank:R (every "
    "matmul but the first and last block's and the heads') and whose checkpoint holds the "
    "truncated-SVD factors of the run's latest weights; prints the parameter counts as JSON.",
  )
  p.add_argument("--workdir", required=True, help="the trained run to convert")
  p.add_argument(
    "--rank",
    type=int,
    required=True,
    help="R: rank of every factorised weight, below min(K, N) of each [K, N] kernel",
  )
  p.add_argument("--out", metavar="DIR", help="new run directory (default: WORKDIR-lowrankR)")
  p.add_argument(
    "--eval",
    action="store_true",
    help="also evaluate both runs on the validation split (perplexity before and after)",
  )
  p.set_defaults(fn=cmd_lowrank)

  p = sub.add_parser(
    "diagnose",
    help="numerics of a trained run: exponent histograms, "
    "fp16/bf16/fp8 under/overflow, policy errors vs float64 (PNG + JSON)",
  )
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", metavar="DIR", help="where diagnose.json/.png go (default: --workdir)")
  p.add_argument(
    "--loss-scale",
    type=float,
    default=None,
    help="scale of the loss before differentiation (default: the run's last "
    "logged loss scale, else 1)",
  )
  p.add_argument(
    "--precision",
    default="fp32",
    help="policy the histograms are measured under (default fp32: true values)",
  )
  p.add_argument(
    "--policies",
    default="fp32,bf16,fp16,pure_bf16",
    help="comma-separated policies compared with float64 ('' to skip)",
  )
  p.add_argument("--batch-size", type=int, default=4, help="validation rows used")
  p.set_defaults(fn=cmd_diagnose)

  p = sub.add_parser(
    "bench", help="time the train step; prints JSON (llm-mp bench --help)", add_help=False
  )
  p.add_argument("bench_args", nargs=argparse.REMAINDER)
  p.set_defaults(fn=cmd_bench)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  tune_malloc()  # before XLA allocates anything; see llm_mp.allocator
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["bench"]:  # its own parser: argparse's REMAINDER would reject its options
    from llm_mp import benchmark  # pylint: disable=import-outside-toplevel

    return benchmark.main(argv[1:])
  parser = build_parser()
  # Overrides may come anywhere, also after an option (`--steps 5 model.n_layers=2`),
  # where argparse has already closed the positional list.
  args, extra = parser.parse_known_args(argv)
  if extra and hasattr(args, "overrides") and all(OVERRIDE.match(a) for a in extra):
    args.overrides = [*args.overrides, *extra]
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  # orbax logs routine notes (opening checkpoints read-only) as absl warnings and the
  # files it cannot parse as absl errors; llm_mp reports unreadable checkpoints itself.
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.FATAL)
  warnings.formatwarning = lambda message, *_a, **_k: f"llm-mp {args.command}: warning: {message}\n"
  try:
    return args.fn(args)
  except (ValueError, OSError) as e:  # OSError: e.g. a permission or a full disk
    print(f"llm-mp {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before train installs its handler (imports, config)
    print(f"llm-mp {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
