"""A task is one file plus one registry line: a task defined here, in the test
file, trains, resumes exactly, evaluates and predicts through the functions the
``llm-mp`` command uses, without any edit of ``llm_mp/``.

The task, ``reverse``: a decoder reads a string of letters and a separator and
writes the letters in reverse order; only the reversed half is scored.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
import pytest

from llm_mp import tasks
from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer, ordered_batches, shuffled_batches
from llm_mp.inference import evaluate_run, predict_run
from llm_mp.metrics import read_metrics
from llm_mp.presets import get_preset
from llm_mp.tasks.base import LM_BATCH_AXES, TaskData, TaskSpec
from llm_mp.tasks.lm import lm_loss, predict_continuation
from llm_mp.train import train

SEP = "|"
LETTERS = 6  # letters per example


class ReverseRows:
  """Rows ``BOS letters SEP reversed EOS pad``; targets only on the reversed part."""

  def __init__(self, n: int, seed: int, seq_len: int, tok: ByteTokenizer):
    rng = np.random.default_rng(seed)
    self.texts = ["".join(rng.choice(list("abcdefgh"), LETTERS)) for _ in range(n)]
    inputs = np.full((n, seq_len), tok.pad_id, np.int32)
    targets = np.full((n, seq_len), -1, np.int32)
    for i, text in enumerate(self.texts):
      ids = [tok.bos_id, *tok.encode(text + SEP), *tok.encode(text[::-1]), tok.eos_id]
      inputs[i, : len(ids) - 1] = ids[:-1]
      start = 1 + LETTERS  # predicting the first reversed letter from the separator
      targets[i, start : len(ids) - 1] = ids[start + 1 :]
    self.arrays = {"inputs": inputs, "targets": targets}

  def __len__(self):
    return len(self.texts)

  def gather(self, idx):
    out = {k: v[np.maximum(idx, 0)] for k, v in self.arrays.items()}
    out["targets"] = np.where((idx >= 0)[:, None], out["targets"], -1)  # padding rows
    return out


@dataclasses.dataclass(frozen=True)
class Prepared:
  tokenizer: ByteTokenizer
  train: ReverseRows
  val: ReverseRows
  sha256: str

  def __str__(self):
    return f"reverse: {len(self.train)} / {len(self.val)} strings of {LETTERS} letters"


def _prepare(config, workdir, tokenizer=None, write=True):
  tok = tokenizer or ByteTokenizer()
  if write:
    tok.save(workdir)
  train_rows = ReverseRows(512, config.train.seed, config.data.seq_len, tok)
  val_rows = ReverseRows(64, 10_000 + config.train.seed, config.data.seq_len, tok)
  sha = hashlib.sha256(json.dumps(train_rows.texts + val_rows.texts).encode()).hexdigest()
  return Prepared(tok, train_rows, val_rows, sha)


def _predict(run, texts, **options):
  prompts = [t + SEP for t in texts]
  return predict_continuation(run, prompts, max_new_tokens=LETTERS, temperature=0.0)


REVERSE = TaskSpec(
  name="reverse",
  families=("decoder",),
  head="lm",
  batch_axes=LM_BATCH_AXES,
  make_loss=lambda config, tokenizer: functools.partial(lm_loss, z_weight=0.0),
  data=TaskData(
    prepare=_prepare,
    train_batches=lambda p, c: shuffled_batches(p.train, c.train.batch_size, c.train.seed),
    eval_batches=lambda p, c, n=None, split="val": ordered_batches(p.val, c.train.batch_size, n),
    check=lambda config, prepared: True,
    on_files=lambda config, paths: (config, "val"),
  ),
  predict=_predict,
)


@pytest.fixture
def reverse_task():
  tasks.register_task(REVERSE)
  yield REVERSE
  tasks.unregister_task("reverse")


def _config(steps, *overrides):
  return apply_overrides(
    get_preset("tiny"),
    [
      "train.task=reverse",
      f"train.steps={steps}",
      "train.batch_size=32",
      "train.log_every=10",
      "train.eval_every=100",
      "train.ckpt_every=50",
      "train.sample_tokens=0",
      "data.seq_len=16",
      "model.n_layers=2",
      "optim.lr=3e-3",
      "optim.warmup_steps=10",
      *overrides,
    ],
  )


@pytest.mark.slow
def test_a_task_registered_outside_llm_mp_trains_resumes_evaluates_and_predicts(
  reverse_task, tmp_path
):
  assert "reverse" in tasks.task_names()
  whole = str(tmp_path / "whole")
  last = train(_config(200, "train.log_every=1"), whole, verbose=False)
  # Exact resume, bit for bit: 20 steps of the same 200-step schedule, stopped at step 10
  # and resumed, repeat the uninterrupted run's first 20 steps.
  parts = str(tmp_path / "parts")
  short = _config(20, "train.log_every=1", "optim.schedule_steps=200")
  train(short, parts, verbose=False, until=10)
  train(short, parts, verbose=False)  # resumes from step 10
  losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]
  assert [s for s, _ in losses(parts)] == list(range(1, 21))
  assert losses(parts) == losses(whole)[:20]
  # Learned: the reversed letters' loss far below uniform over 8 letters (ln 8 = 2.08).
  assert last["val_loss"] < 1.0, last
  evaluated = evaluate_run(whole)
  assert evaluated["step"] == 200
  np.testing.assert_allclose(evaluated["val_loss"], last["val_loss"], rtol=1e-5)
  texts = ["abcdef", "hgfedc", "aabbcc"]
  predicted = predict_run(whole, texts)
  letters = [(a, b) for p, t in zip(predicted, texts) for a, b in zip(p, t[::-1])]
  assert len(letters) == 3 * LETTERS, predicted  # six letters after each separator
  assert sum(a == b for a, b in letters) > 0.5 * len(letters), predicted  # chance: 1/8


def test_the_cli_offers_a_registered_task_and_rejects_a_wrong_family(reverse_task, tmp_path):
  from llm_mp import cli  # pylint: disable=import-outside-toplevel

  parser = cli.build_parser()
  args = parser.parse_args(["train", "--workdir", str(tmp_path), "--task", "reverse"])
  assert args.task == "reverse"
  encoder = apply_overrides(get_preset("encoder_tiny"), ["train.task=reverse"])
  with pytest.raises(ValueError, match=r"train.task='reverse' needs model.family in \['decoder'\]"):
    train(encoder, str(tmp_path / "enc"), verbose=False)
  assert not os.path.exists(tmp_path / "enc" / "config.json")  # nothing written
