"""A run directory loses nothing and confuses no one: its lock, its corpus, its
metrics, the checks made before step 1, and the errors for unusable workdirs."""

import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest

from llm_mp import cli, data
from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.data import TokenSplit
from llm_mp.metrics import read_metrics, truncate_metrics
from llm_mp.optim import make_schedule
from llm_mp.rundir import (
  ConfigConflictError,
  WorkdirBusyError,
  check_config,
  check_workdir,
  stored_config,
  with_schedule_steps,
  workdir_lock,
  write_config,
)
from llm_mp.tasks import task_spec
from llm_mp.train import check_data, train

TEXT = "\n\n\n".join(
  f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(12)
)


def _config(path, steps=3, **train_kw):
  return Config(
    model=ModelConfig.gpt2(d_model=16, n_layers=1, n_heads=2, max_len=16),
    optim=OptimConfig(warmup_steps=1),
    data=DataConfig(paths=(path,), seq_len=16, val_fraction=0.2),
    train=TrainConfig(
      **{
        **dict(
          steps=steps,
          batch_size=8,
          log_every=100,
          eval_every=100,
          eval_batches=1,
          ckpt_every=100,
          sample_tokens=0,
        ),
        **train_kw,
      }
    ),
  )


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus" / "text.txt"
  path.parent.mkdir()
  path.write_text(TEXT, encoding="utf-8")
  return path


def test_a_second_trainer_is_refused_naming_the_holders_pid(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock(workdir):
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
      with workdir_lock(workdir):
        pass
    with pytest.raises(WorkdirBusyError, match="in use by another trainer"):
      train(_config(str(corpus)), workdir, verbose=False)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
  with workdir_lock(workdir):  # released on exit
    pass


@pytest.mark.slow
def test_resume_from_another_directory_and_a_changed_corpus_conflicts(
  corpus, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "run")
  monkeypatch.chdir(corpus.parent)
  train(_config("text.txt", steps=2), workdir, verbose=False)
  stored = stored_config(workdir)
  assert stored.data.paths == (str(corpus),)  # absolute, whatever the cwd was
  monkeypatch.chdir(tmp_path)
  (tmp_path / "text.txt").write_text("A different corpus entirely. " * 40, encoding="utf-8")
  # The stored config resumes from another directory, on the original corpus.
  train(
    dataclasses.replace(stored, train=dataclasses.replace(stored.train, steps=3)),
    workdir,
    verbose=False,
  )
  assert read_metrics(workdir)[-1]["step"] == 3
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  assert train(stored, workdir, verbose=False) == {}  # steps=2 < 3: nothing to do...
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before  # ...kept
  corpus.write_text(TEXT.replace("fox", "cat"), encoding="utf-8")
  with pytest.raises(ConfigConflictError, match="sha256"):
    train(
      dataclasses.replace(stored, train=dataclasses.replace(stored.train, steps=4)),
      workdir,
      verbose=False,
    )


@pytest.mark.slow
def test_one_document_trains_and_nothing_to_evaluate_fails_before_step_1(tmp_path):
  one = tmp_path / "one.txt"
  one.write_text("A single document of text. " * 20, encoding="utf-8")
  workdir = str(tmp_path / "run")
  config = _config(str(one))
  prepared = data.prepare_data(config.data, str(tmp_path / "prep"))
  # 20% of the document's characters (+ bos/eos) are held out, not 0 documents.
  assert prepared.val.num_tokens == round(0.2 * len(one.read_text().strip())) + 2
  assert "% of tokens" in str(prepared)
  assert check_data(config, prepared, task_spec(config)) is True
  last = train(config, workdir, verbose=False)  # evaluates at step 3, the last
  assert last["val_loss"] > 0
  empty = dataclasses.replace(
    prepared, val=TokenSplit(np.zeros(0, np.uint16), np.zeros(0, np.int64))
  )
  with pytest.raises(ValueError, match="data.val_fraction=0.2 leaves no validation text"):
    check_data(config, empty, task_spec(config))
  off = dataclasses.replace(config, data=dataclasses.replace(config.data, val_fraction=0.0))
  assert check_data(off, empty, task_spec(off)) is False  # evaluation is off
  last = train(off, workdir + "_off", verbose=False)  # step 3 is the last: no eval, no crash
  assert "loss" in last and "val_loss" not in last
  small = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=100))
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    check_data(small, prepared, task_spec(small))
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    train(small, workdir + "_small", verbose=False)
  assert not os.path.exists(os.path.join(workdir + "_small", "checkpoints"))


def test_notebook_runs_are_ignored_by_git():
  # The notebooks write into a temporary directory (tests/test_notebooks.py checks that
  # nothing lands in the repository); a run made by hand under notebooks/runs is ignored too.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  notebooks = sorted(n for n in os.listdir(os.path.join(root, "notebooks")) if n.endswith(".ipynb"))
  assert len(notebooks) == 3
  for name in notebooks:
    source = "".join(
      "".join(c["source"])
      for c in json.load(open(os.path.join(root, "notebooks", name), encoding="utf-8"))["cells"]
    )
    assert "tempfile.mkdtemp" in source, name
  r = subprocess.run(
    ["git", "check-ignore", "-q", "notebooks/runs/x/config.json"], cwd=root, check=False
  )
  assert r.returncode == 0, "notebooks/runs/ is not ignored by .gitignore"


@pytest.mark.slow
def test_evaluation_runs_at_eval_steps_that_are_not_log_steps_with_a_sample(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  train(
    _config(str(corpus), steps=5, log_every=2, eval_every=3, sample_tokens=4),
    workdir,
    verbose=False,
  )
  records = {r["step"]: r for r in read_metrics(workdir)}
  assert sorted(records) == [2, 3, 4, 5]
  assert [s for s in records if "val_loss" in records[s]] == [3, 5]
  assert isinstance(records[3]["sample"], str) and "sample" not in records[2]


def test_schedule_length_is_fixed_when_the_run_is_created(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(str(corpus), steps=100)
  created = with_schedule_steps(config, None)
  assert created.optim.schedule_steps == 100
  write_config(workdir, created)
  longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=300))
  resumed = with_schedule_steps(longer, stored_config(workdir))
  assert resumed.optim.schedule_steps == 100 and resumed.train.steps == 300
  check_config(workdir, longer)  # extending a run is no conflict...
  lr = make_schedule(resumed.optim, resumed.train.steps)
  assert float(lr(100)) == pytest.approx(config.optim.lr * config.optim.end_lr_ratio)
  # ...changing its schedule is.
  other = dataclasses.replace(longer, optim=dataclasses.replace(longer.optim, schedule_steps=300))
  with pytest.raises(ConfigConflictError, match="optim.schedule_steps=100"):
    check_config(workdir, other)


def test_resume_truncates_metrics_to_the_restored_step_and_whole_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo', encoding="utf-8")
  truncate_metrics(str(tmp_path), 3)
  assert path.read_text(encoding="utf-8") == "\n".join(lines[:3]) + "\n"
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_read_metrics_skips_a_broken_line_with_a_warning(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1}\n{"step": 2, "lo{"step": 3}\n[4]\n{"step": 5}\n', encoding="utf-8"
  )
  with pytest.warns(UserWarning) as caught:
    records = read_metrics(str(tmp_path))
  assert [str(w.message).split(": ")[0].rsplit(":", 1)[1] for w in caught] == ["2", "3"]
  assert [r["step"] for r in records] == [1, 5]


def test_unusable_workdirs_are_one_line_errors(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="is empty"):
    check_workdir("")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    check_workdir(str(a_file))
  with pytest.raises(ValueError, match="not writable"):
    check_workdir(str(a_file / "sub"))
  check_workdir(str(tmp_path / "new" / "run"))  # a new directory is fine...
  assert not (tmp_path / "new").exists()  # ...and nothing is created yet


@pytest.mark.parametrize(
  "text,message",
  [
    ("", "the file is empty"),
    ("{", "invalid JSON at line 1"),
    ('{"train": {"steps": 10.0}}', "train.steps=10.0 is not of type int"),
    ('{"model": {"n_heads": 3}}', "model.n_heads=3"),
  ],
)
def test_bad_config_json_is_named(text, message, tmp_path):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError) as e:
    stored_config(str(tmp_path))
  assert str(e.value).startswith(str(tmp_path / "config.json")) and message in str(e.value)


def _cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--steps", "0"], "train.steps=0"),
    (["--mesh", "data=abc"], "--mesh data='abc'"),
    (["train.steps=2.5"], "train.steps='2.5' is not of type int"),
    (["--workdir", ""], "--workdir is empty"),
  ],
)
def test_cli_bad_arguments_are_named(args, needle, tmp_path, capsys):
  workdir = ["--workdir", str(tmp_path / "w")] if "--workdir" not in args else []
  code, _, err = _cli(["train"] + workdir + args, capsys)
  assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "w")
