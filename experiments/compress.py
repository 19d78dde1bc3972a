"""Compress, then recover: students of a bf16 teacher trained with cross-entropy alone
and with distillation from the teacher, at equal steps.

Trains the teacher (the tiny preset, bf16), then makes each student (:data:`STUDENTS`)
as a step-0 run directory: the truncated SVD of the teacher (``llm-mp lowrank``) at
each rank, the teacher under int8 quantisation-aware training, and a narrower model
from a fresh initialisation (one per seed). Every student is trained the same number
of steps from that directory twice, with ``train.task=lm`` (the data's cross-entropy)
and with ``train.task=distill`` (``train.teacher``: the teacher; weight 0.5,
temperature 2), for each seed (data order; the narrow model's initialisation). Reports
the validation perplexity of the teacher, of each student before training and after
each method (mean and sample standard deviation over seeds), the fraction of the gap
to the teacher each method recovers, and the per-seed difference distillation minus
cross-entropy. Writes ``results.json``, ``results.md`` and ``compress.png`` to
``--out``.

  python -m experiments.compress           # the setting docs/compress.md reports
  python -m experiments.compress --fast    # a minute (CI): a 3-layer model, 1 seed, 1% held out

Measured 2026-12-07 on a 2-core CPU shared with other jobs (61 minutes under load):
distillation ended below cross-entropy in every compressed row, by 0.037 +- 0.008 (SVD
rank 32), 0.043 +- 0.002 (16), 0.101 +- 0.014 (8) and 0.045 +- 0.016 (int8 QAT)
perplexity, beyond the seed spread; above it for the narrow student from scratch
(+1.81 +- 0.11). The table and its reading are in docs/compress.md.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Mapping, Sequence

import jax

from experiments import common
from llm_mp import sharding
from llm_mp.builder import build_recipe
from llm_mp.config import Config, apply_overrides
from llm_mp.inference import evaluate_run
from llm_mp.lowrank_convert import convert_run
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run, write_run
from llm_mp.state import create_sharded_state, param_count
from llm_mp.train import train

TEACHER = ("precision.policy=bf16",)
RANKS = (32, 16, 8)
NARROW = 64  # the narrow student's d_model (the teacher's: 128)
METHODS = {  # name -> the task; distillation adds train.teacher
  "cross-entropy": "lm",
  "distillation": "distill",
}
STUDENT_RUN = (  # the students' optimisation: a gentler lr than the teacher's, short warm-up
  "optim.lr=1e-3",
  "optim.warmup_steps=10",
  "train.distill_weight=0.5",
  "train.distill_temperature=2.0",
)


def student_overrides(ranks: Sequence[int], narrow: int) -> dict[str, list[str]]:
  """Each student's name (table order) and its config's difference from the teacher's."""
  students = {f"SVD rank {r}": [f"precision.formats=lowrank:{r}"] for r in ranks}
  students["int8 QAT"] = ["precision.formats=int8"]
  students[f"narrow (d_model {narrow}, from scratch)"] = [f"model.d_model={narrow}"]
  return students


def _config(overrides: Sequence[str]) -> Config:
  return apply_overrides(get_preset("tiny"), [*TEACHER, *overrides])


def start_dir(out: str, name: str, overrides: Sequence[str], seed: int) -> str:
  """Where a student starts: one directory for a conversion of the teacher, one per
  seed for a fresh initialisation (a ``model.`` override)."""
  fresh = any(o.startswith("model.") for o in overrides)
  return os.path.join(out, "students", common.slug(name) + (f"_seed{seed}" if fresh else ""))


def write_start(to: str, config: Config, teacher: str, seed: int) -> None:
  """Writes a student's step-0 run directory ``to`` (unless it exists): the teacher's
  truncated SVD (``llm-mp lowrank``) for a low-rank ``config``, the teacher's
  parameters for one of the teacher's architecture (int8 QAT), a fresh
  initialisation with ``seed`` for another architecture."""
  if os.path.isdir(to):
    return
  if config.precision.formats.startswith("lowrank:"):
    convert_run(teacher, int(config.precision.formats.split(":")[1]), to)
    return
  run = load_run(teacher)
  if config.model == run.config.model:
    write_run(to, config, run.params, run.tokenizer)
    return
  recipe = build_recipe(config, run.tokenizer)
  mesh = sharding.make_mesh(config.mesh)
  state, _ = create_sharded_state(recipe.model, recipe.tx, config, mesh, jax.random.key(seed))
  write_run(to, config, state.params, run.tokenizer)


def perplexity(workdir: str, trained: Mapping[str, Any] | None = None) -> float:
  """Validation perplexity of a run's latest checkpoint (the whole validation split).

  ``trained``: what ``train`` returned for the run. Its final evaluation read the whole
  split (``train.eval_batches=0``), so its perplexity is the checkpoint's; a run that was
  complete before (``{}``) or stopped is evaluated from its checkpoint instead."""
  if trained and "val_ppl" in trained and "interrupted" not in trained:
    return trained["val_ppl"]
  return evaluate_run(workdir)["val_ppl"]


def summarise(teacher_ppl: float, before: float, after: dict[str, list[float]]) -> dict:
  """Per method: perplexity after and the recovered fraction of the gap to the teacher
  ``(before - after) / (before - teacher)`` (mean, sd over seeds; None when the student
  starts within 1% of the teacher: no gap to speak of); the per-seed difference
  distillation minus cross-entropy (negative: distillation is better), and whether it
  is beyond the seed spread (``|mean| > 2 sd``)."""
  gap = before - teacher_ppl
  out: dict[str, Any] = {}
  for method, ppls in after.items():
    recovered = [(before - p) / gap for p in ppls] if gap > 0.01 * teacher_ppl else None
    out[method] = {
      "ppl": common.mean_sd(ppls),
      "recovered": None if recovered is None else common.mean_sd(recovered),
    }
  if set(after) == set(METHODS):
    diffs = [d - c for d, c in zip(after["distillation"], after["cross-entropy"])]
    mean, sd = common.mean_sd(diffs)
    out["difference"] = {"ppl": (mean, sd), "beyond_spread": len(diffs) > 1 and abs(mean) > 2 * sd}
  return out


def markdown(results: dict[str, Any]) -> str:
  """The results table (perplexities on the validation split)."""
  pm = lambda ms, f="{:.3f}": "-" if ms is None else f"{f.format(ms[0])} ± {f.format(ms[1])}"
  n = len(results["seeds"])
  lines = [
    f"Teacher (bf16, {results['teacher']['params']:,} parameters): perplexity "
    f"{results['teacher']['ppl']:.3f}. Students trained {results['steps']} steps; "
    f"mean ± sd over {n} seed(s).",
    "",
  ]
  if not results["complete"]:
    lines += [
      "**Partial**: the run stopped before its end; each row's seeds are those it reached.",
      "",
    ]
  lines += [
    "| student | params | seeds | before | after, cross-entropy | after, distillation | "
    "gap recovered, CE | gap recovered, distill | distill − CE (per seed) | beyond spread |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, s in results["students"].items():
    m = s["summary"]
    ce, kd = m["cross-entropy"], m["distillation"]
    d = m.get("difference")
    lines.append(
      f"| {name} | {s['params']:,} | {len(s['after']['distillation'])} | {s['before']:.3f} | "
      f"{pm(ce['ppl'])} | {pm(kd['ppl'])} | "
      f"{pm(ce['recovered'], '{:.2f}')} | {pm(kd['recovered'], '{:.2f}')} | "
      f"{pm(d['ppl']) if d else '-'} | {('yes' if d['beyond_spread'] else 'no') if d else '-'} |"
    )
  return "\n".join(lines)


def plot(results: dict[str, Any], out: str) -> None:
  """``compress.png``: each student's perplexity before and after each method (error
  bars: sd over seeds), the teacher dashed."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = list(results["students"])
  fig, ax = plt.subplots(figsize=(9, 4.2))
  width = 0.27
  for i, (label, color) in enumerate(
    (("before", "tab:gray"), ("cross-entropy", "tab:blue"), ("distillation", "tab:orange"))
  ):
    rows = [results["students"][n] for n in names]
    if label == "before":
      values, errors = [r["before"] for r in rows], None
    else:
      values = [r["summary"][label]["ppl"][0] for r in rows]
      errors = [r["summary"][label]["ppl"][1] for r in rows]
    xs = [j + (i - 1) * width for j in range(len(names))]
    ax.bar(xs, values, width, yerr=errors, label=label, color=color, capsize=2)
  ax.axhline(results["teacher"]["ppl"], color="k", lw=0.8, ls="--", label="teacher")
  values = [
    v for r in results["students"].values() for v in (r["before"], *r["after"]["distillation"])
  ]
  if max(values) > 3 * min(values):  # a fresh student starts near the uniform level
    ax.set_yscale("log")
  else:  # differences of a few hundredths: the axis starts near the lowest bar
    ax.set_ylim(0.98 * min(*values, results["teacher"]["ppl"]), 1.01 * max(values))
  ax.set_xticks(range(len(names)), names, fontsize=8)
  ax.set(ylabel="validation perplexity", title=f"After {results['steps']} steps")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "compress.png"), dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.compress", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--teacher-steps", type=int, default=600)
  parser.add_argument("--steps", type=int, default=100, help="training steps of every student")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
  parser.add_argument("--narrow", type=int, default=NARROW, help="the narrow student's d_model")
  parser.add_argument("--data", nargs="*", default=[], help="text files (default: embedded)")
  parser.add_argument("--out", default="runs/compress", help="runs, table and figure")
  parser.add_argument("--fast", action="store_true", help="a 3-layer model, 1 seed (CI)")
  parser.add_argument("overrides", nargs="*", metavar="section.field=value")
  args = parser.parse_args(argv)
  # One evaluation per run, at its end, over the whole validation split: the table's.
  base = [
    *args.overrides,
    *common.data_paths(args.data),
    "train.keep_checkpoints=1",
    "train.eval_batches=0",
  ]
  if args.fast:
    args.teacher_steps, args.steps, args.seeds, args.ranks, args.narrow = 40, 4, [0], [4], 16
    base = [*common.FAST_LM, *base]
  t0 = time.perf_counter()
  teacher = os.path.join(args.out, "teacher")
  trained = train(_config([*base, *common.quiet_run(args.teacher_steps)]), teacher, verbose=False)
  teacher_ppl = perplexity(teacher, trained)
  print(f"teacher: perplexity {teacher_ppl:.3f}", flush=True)
  results = {
    "device": jax.default_backend(),
    "steps": args.steps,
    "seeds": args.seeds,
    "teacher": {"ppl": teacher_ppl, "params": param_count(load_run(teacher).params)},
    "students": {},
    "complete": False,
  }
  students = student_overrides(args.ranks, args.narrow)
  for name, diff in students.items():
    starts = {seed: start_dir(args.out, name, diff, seed) for seed in args.seeds}
    for seed, start in starts.items():
      write_start(start, _config([*base, *diff, f"train.seed={seed}"]), teacher, seed)
    before = perplexity(starts[args.seeds[0]])
    after: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in args.seeds:  # both methods per seed: a stopped run leaves paired rows
      for method, task in METHODS.items():
        overrides = [
          *base,
          *diff,
          *STUDENT_RUN,
          *common.quiet_run(args.steps),
          f"train.seed={seed}",
          f"train.task={task}",
          f"train.init_from={os.path.abspath(starts[seed])}",
        ]
        if task == "distill":
          overrides.append(f"train.teacher={os.path.abspath(teacher)}")
        workdir = os.path.join(args.out, common.slug(f"{name} {method} seed{seed}"))
        trained = train(_config(overrides), workdir, verbose=False)
        after[method].append(perplexity(workdir, trained))
        print(f"{name}, {method}, seed {seed}: perplexity {after[method][-1]:.3f}", flush=True)
      results["students"][name] = {
        "params": param_count(load_run(starts[args.seeds[0]]).params),
        "before": before,
        "after": after,
        "summary": summarise(teacher_ppl, before, after),
      }
      done = sum(len(s["after"]["distillation"]) for s in results["students"].values())
      results["complete"] = done == len(students) * len(args.seeds)
      results["seconds"] = round(time.perf_counter() - t0, 1)
      # Written after every seed: a run stopped early leaves its table so far.
      common.write_results(args.out, results, markdown(results), {**vars(args), "overrides": base})
  try:
    plot(results, args.out)
  except ImportError:
    print("matplotlib not installed (pip install llm_mp[plots]): no figure")
  print(markdown(results))
  print(f"total {results['seconds']} s; written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
