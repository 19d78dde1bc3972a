"""The fixed splits of the public text-to-text sets (experiments/datasets.py): sizes, disjoint
splits, the BBC summaries' spacing, the lead-3 baseline on the BBC test split."""

import os

import pytest

from experiments import datasets
from llm_mp.data import DataError
from llm_mp.text_metrics import lead3, rouge

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")


@needs_data
def test_task_splits_have_the_documented_sizes_and_are_disjoint():
  # Computed once from the files and pinned (also documented in experiments/datasets.py).
  sizes = {
    "translate": (29_000, 1_014, 1_000),
    "summarize": (1_765, 244, 216),
    "qa": (8_391, 601, 1_578),
  }
  loaded = {
    task: {s: datasets.load_task_data(task, s, DATA) for s in datasets.SPLITS} for task in sizes
  }
  for task, expected in sizes.items():
    got = tuple(len(loaded[task][s].inputs) for s in datasets.SPLITS)
    assert got == expected == tuple(datasets.SPLIT_SIZES[task][s] for s in datasets.SPLITS), task
    for split in loaded[task].values():
      assert len(split.targets) == len(split.references) == len(split.inputs)
      assert all(r[0] == t for r, t in zip(split.references, split.targets))
  first = loaded["translate"]["train"]
  assert first.inputs[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
  assert first.targets[0] == "Two young, White males are outside near many bushes."
  # SQuAD 10,570 questions with 34,726 gold answers in all; no paragraph in two splits.
  qa = loaded["qa"]
  assert sum(len(r) for s in qa.values() for r in s.references) == 34_726
  contexts = {s: {x.split(" context: ", 1)[1] for x in qa[s].inputs} for s in qa}
  assert not contexts["train"] & contexts["test"] and not contexts["validation"] & (
    contexts["train"] | contexts["test"]
  )
  assert (
    qa["test"]
    .inputs[0]
    .startswith(
      "question: What was Maria Curie the first female "
      "recipient of? context: One of the most famous"
    )
  )
  assert qa["test"].references[0] == ["Nobel Prize"] * 3
  # BBC: duplicate articles stay on one side; summaries get their sentence spaces back.
  bbc = loaded["summarize"]
  articles = {s: set(bbc[s].inputs) for s in bbc}
  assert not articles["train"] & articles["test"] and not articles["validation"] & (
    articles["train"] | articles["test"]
  )
  assert len(bbc["train"].inputs) - len(articles["train"]) > 0  # duplicates exist, in train
  assert "from $10.9bn. For the full-year" in bbc["test"].targets[0]


def test_fix_summary_spacing_uses_the_article():
  article = (
    'Title\n\nProfits rose to $10.9bn. For the year, fine.\n\nHe said it "went well". '
    'Sales at the U.S. unit grew. Markets were "tuned". The end. Analysts were calm. '
    '"I think so," he said.'
  )
  summary = (
    'Profits rose to $10.9bn.For the year, fine.He said it "went well".Sales at the '
    'U.S. unit grew.Analysts were calm."I think so," he said.'
  )
  assert datasets.fix_summary_spacing(summary, article) == (
    'Profits rose to $10.9bn. For the year, fine. He said it "went well". Sales at the '
    'U.S. unit grew. Analysts were calm. "I think so," he said.'
  )


def test_load_task_data_rejects_unknown_names(tmp_path):
  with pytest.raises(ValueError, match=r"task='mt' must be one of"):
    datasets.load_task_data("mt", "train", str(tmp_path))
  with pytest.raises(ValueError, match=r"split='dev' must be one of"):
    datasets.load_task_data("qa", "dev", str(tmp_path))
  with pytest.raises(ValueError, match=r"direction='de-fr' must be"):
    datasets.load_task_data("translate", "test", str(tmp_path), direction="de-fr")
  with pytest.raises(DataError, match=r"parallel source file not found: .*test_2016_flickr\.en"):
    datasets.load_task_data("translate", "test", str(tmp_path), direction="en-de")


@needs_data
def test_lead3_rouge_on_the_bbc_test_split():
  # The summarisation baseline, pinned to 3 decimals: on the first 100 test articles, the
  # ones `python -m experiments.seq2seq --task summarize` decodes, it is the lead-3 row of
  # docs/seq2seq.md (48.27 / 39.77 / 38.56); on all 216, lower.
  test = datasets.load_task_data("summarize", "test", DATA)
  expected = {
    100: {"rouge1": 48.273, "rouge2": 39.770, "rougeL": 38.564},
    216: {"rouge1": 45.254, "rouge2": 36.564, "rougeL": 35.466},
  }
  assert len(test.inputs) == 216
  for n, want in expected.items():
    got = rouge([lead3(a, skip_title=True) for a in test.inputs[:n]], test.targets[:n])
    for k, v in want.items():
      assert got[k] == pytest.approx(v, abs=1e-3), (n, k)
