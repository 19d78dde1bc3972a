"""Pre-train with masked LM, fine-tune a classifier from that run: the whole path
through ``llm_mp.train.train`` (config -> data -> builder -> step -> checkpoints)."""

import dataclasses
import functools
import json

import chex
import jax
import numpy as np
import pytest

from llm_mp.config import apply_overrides
from llm_mp.data.pipeline import prepare_data
from llm_mp.inference import evaluate_run
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.train import train

TINY = (
  "model.d_model=32",
  "model.n_layers=2",
  "model.n_heads=2",
  "data.seq_len=32",
  "train.batch_size=16",
  "data.max_docs=300",
  "train.log_every=5",
)


def _config(*overrides):
  return apply_overrides(get_preset("encoder_tiny"), [*TINY, *overrides])


@functools.cache
def _pretrained(tmp_root):
  workdir = f"{tmp_root}/mlm"
  # Long enough to go below the unigram level (see the first test), at lr 3e-3 (preset 1e-3).
  steps = (f"train.{k}=600" for k in ("steps", "eval_every", "ckpt_every"))
  overrides = ("optim.lr=3e-3", "optim.warmup_steps=10", "train.eval_batches=50")
  train(_config(*steps, *overrides), workdir, verbose=False)
  return workdir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return _pretrained(str(tmp_path_factory.mktemp("finetune")))


@pytest.mark.slow
def test_mlm_pretraining_counts_only_selected_tokens(pretrained):
  records = [json.loads(line) for line in open(f"{pretrained}/metrics.jsonl", encoding="utf-8")]
  # ~15% of the 16 x 32 tokens per batch (minus BOS/EOS/padding) are predicted.
  tokens = [r["tokens"] for r in records]
  assert all(0.08 * 16 * 32 < t < 0.2 * 16 * 32 for t in tokens), tokens
  # Byte frequencies alone give the validation split's unigram entropy, 3.30 nats; measured
  # after 600 steps: 3.07 (over 4,346 selected tokens: a standard error of ~0.03).
  prepared = prepare_data(_config().data, pretrained, write=False)
  tokenizer, val = prepared.tokenizer, np.asarray(prepared.val.tokens)
  val = val[~np.isin(val, [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id])]
  p = np.bincount(val) / len(val)
  unigram = -np.sum(p[p > 0] * np.log(p[p > 0]))
  assert records[-1]["val_loss"] < unigram - 0.1, (records[-1]["val_loss"], unigram)


@pytest.mark.slow
def test_finetuning_loads_the_backbone_and_keeps_frozen_layers(pretrained, tmp_path):
  workdir = str(tmp_path / "cls")
  config = _config(
    "train.task=classify",
    "train.steps=3",
    "train.eval_every=3",
    f"train.init_from={pretrained}",
    "train.freeze=embed/*,encoder/blocks_0/*",
  )
  train(config, workdir, verbose=False)
  source, tuned = load_run(pretrained), load_run(workdir)
  src, new = jax.device_get(source.params), jax.device_get(tuned.params)
  chex.assert_trees_all_equal(new["embed"], src["embed"])
  chex.assert_trees_all_equal(new["encoder"]["blocks_0"], src["encoder"]["blocks_0"])
  assert not np.array_equal(
    new["encoder"]["blocks_1"]["mlp"]["up"]["kernel"],
    src["encoder"]["blocks_1"]["mlp"]["up"]["kernel"],
  )
  assert set(new) - set(src) == {"pooler", "classifier"}
  # The fine-tuned run keeps its source's tokenizer.
  assert open(f"{workdir}/tokenizer.json").read() == open(f"{pretrained}/tokenizer.json").read()


def test_init_from_a_different_architecture_is_a_clear_error(pretrained, tmp_path):
  config = _config(
    "train.task=classify", "train.steps=1", "model.d_model=64", f"train.init_from={pretrained}"
  )
  with pytest.raises(ValueError, match=r"its model.d_model=32 differs from model.d_model=64"):
    train(config, str(tmp_path / "x"), verbose=False)
  decoder = dataclasses.replace(
    config,
    model=dataclasses.replace(config.model, d_model=32, family="decoder"),
    train=dataclasses.replace(config.train, task="lm"),
  )
  with pytest.raises(
    ValueError,
    match=r"its model.family='encoder' differs from "
    r"model.family='decoder'",
  ):
    train(decoder, str(tmp_path / "y"), verbose=False)


@pytest.mark.slow  # 600 steps
def test_classifier_beats_chance_on_the_builtin_set(tmp_path):
  # From scratch on the built-in sentiment set (balanced: chance is 0.5).
  workdir = str(tmp_path / "scratch")
  # Measured: 0.79 after 800 steps, ~0.75 after 600 (seed 0); 0.5 is chance.
  config = _config(
    "train.task=classify",
    "train.steps=600",
    "train.eval_every=600",
    "optim.lr=2e-3",
    "optim.warmup_steps=20",
    "model.dropout=0.0",
    "model.pool=mean",
    "model.d_model=64",
    "model.n_heads=4",
    "train.eval_batches=0",  # the whole dev set
  )
  last = train(config, workdir, verbose=False)
  assert last["val_accuracy"] >= 0.7, last
  result = evaluate_run(workdir)  # the whole dev set (500 examples)
  assert result["val_examples"] == 500
  np.testing.assert_allclose(result["val_accuracy"], last["val_accuracy"], rtol=1e-6)


def test_bad_labelled_rows_name_the_file_and_line(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("sentence\tlabel\ngood film\t1\nbad film\t\n", encoding="utf-8")
  config = _config("train.task=classify", "train.steps=1", "data.text_field=sentence")
  config = dataclasses.replace(config, data=dataclasses.replace(config.data, paths=(str(path),)))
  with pytest.raises(ValueError, match=r"train.tsv:3: "):
    train(config, str(tmp_path / "run"), verbose=False)


@pytest.mark.parametrize("task, fresh", [("mlm", set()), ("classify", {"pooler", "classifier"})])
@pytest.mark.slow
def test_a_fine_tuning_run_starts_from_the_source_parameters_and_a_fresh_optimizer(
  pretrained, tmp_path, task, fresh
):
  # MLM from an MLM run keeps every parameter (the state is built around the source's: no
  # random initialisation); a classifier draws its fresh heads and loads the rest.
  from llm_mp import checkpoint, data  # pylint: disable=import-outside-toplevel
  from llm_mp.train import build  # pylint: disable=import-outside-toplevel

  config = _config(f"train.task={task}", f"train.init_from={pretrained}")
  manager = checkpoint.make_manager(str(tmp_path / "checkpoints"))
  run = build(config, manager, say=lambda *_: None, tokenizer=data.load_tokenizer(pretrained))
  manager.close()
  source = jax.device_get(load_run(pretrained).params)
  params = jax.device_get(run.state.params)
  assert set(params) - set(source) == fresh
  chex.assert_trees_all_equal({k: params[k] for k in source}, source)
  assert int(run.state.step) == 0
  # Adam's moments and counts all start at zero, whatever the parameters.
  assert not any(np.asarray(x).any() for x in jax.tree.leaves(run.state.opt_state))
