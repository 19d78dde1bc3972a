"""Experiments run through their fast settings and write their tables and figures."""

import json
import os

from experiments import finetune_classify


def test_finetune_classify_fast_writes_table_and_plot(tmp_path):
  out = str(tmp_path / "ft")
  assert finetune_classify.main(["--fast", "--builtin", "--seeds", "1", "--precisions", "fp32",
                                 "--out", out]) == 0
  results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
  assert results["labelled"] == "built-in sentiment set"
  assert results["bow"]["accuracy"] >= 0.95  # the yardstick separates the built-in set
  assert set(results["runs"]) == {"fp32, fine-tuned", "fp32, from scratch"}
  for run in results["runs"].values():
    assert 0.0 <= run["accuracy"][0] <= 1.0 and len(run["per_seed"]) == 1
  table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "| encoder, fine-tuned | fp32 |" in table
  assert os.path.getsize(os.path.join(out, "results.png")) > 1000


def test_precision_study_fast_writes_table_and_figures(tmp_path):
  from experiments import precision_study  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "ps")
  settings = ["fp32", "fp16 + dynamic scale", "fp16, no scaling"]
  assert precision_study.main(["--fast", "--out", out, "--settings", *settings]) == 0
  results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
  assert list(results["table"]) == settings and results["seeds"] == 1
  for row in results["table"].values():
    assert row["loss"][0] > 0 and 0.0 <= row["grad_zero_fraction"][0] <= 1.0
  table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "| fp16, no scaling |" in table
  for figure in ("loss.png", "underflow.png"):
    assert os.path.getsize(os.path.join(out, figure)) > 1000
