"""Stopping a trainer at any moment loses nothing: SIGINT or SIGTERM at every
phase (data preparation and BPE training, model building, the first step's
compilation, the loop) ends with one line and a run that the same command
resumes; the workdir lock holds across processes and dies with its holder.

The signals are sent at a phase by wrapping the function that starts it
(:func:`signal_at`), never after a sleep, so every test is deterministic.
"""

import os
import signal
import subprocess
import sys

import pytest

import llm_mp.data.examples
import llm_mp.train
from llm_mp import sharding
from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.metrics import read_metrics
from llm_mp.rundir import WorkdirBusyError, workdir_lock
from llm_mp.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "\n\n\n".join(
  f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(12)
)


def _config(path, steps=4, tokenizer="byte"):
  return Config(
    model=ModelConfig.gpt2(d_model=16, n_layers=1, n_heads=2, max_len=16, vocab_size=320),
    optim=OptimConfig(warmup_steps=1),
    data=DataConfig(
      paths=(path,), seq_len=16, val_fraction=0.2, tokenizer=tokenizer, bpe_vocab_size=300
    ),
    train=TrainConfig(
      steps=steps,
      batch_size=8,
      log_every=1,
      eval_every=100,
      eval_batches=1,
      ckpt_every=100,
      sample_tokens=0,
    ),
  )


def signal_at(phase, signum, setattr_=setattr):
  """Makes this process send itself ``signum`` when ``phase`` starts.

  ``phase``: ``tokenizer`` (before BPE training), ``build`` (model building),
  ``compile`` (the first call of the train step, which compiles it) or
  ``step3`` (the third step). ``setattr_`` patches (pytest's
  ``monkeypatch.setattr`` undoes it after the test).
  """
  kill = lambda: os.kill(os.getpid(), signum)

  def before(fn, calls=1):
    seen = [0]

    def wrapped(*args, **kwargs):
      seen[0] += 1
      if seen[0] == calls:
        kill()
      return fn(*args, **kwargs)

    return wrapped

  if phase == "tokenizer":
    setattr_(llm_mp.data.examples, "build_tokenizer", before(llm_mp.data.examples.build_tokenizer))
  elif phase == "build":
    setattr_(llm_mp.train, "build", before(llm_mp.train.build))
  elif phase in ("compile", "step3"):
    jit = sharding.jit_train_step
    calls = 1 if phase == "compile" else 3
    setattr_(sharding, "jit_train_step", lambda *a, **k: before(jit(*a, **k), calls))
  else:
    raise ValueError(f"unknown phase {phase!r}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "text.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


def _steps(workdir):
  return [r["step"] for r in read_metrics(workdir)]


@pytest.mark.parametrize(
  "phase, signum, tokenizer",
  [("tokenizer", signal.SIGINT, "bpe"), ("build", signal.SIGTERM, "byte")],
  ids=["sigint-bpe-training", "sigterm-model-building"],
)
@pytest.mark.slow
def test_a_signal_before_the_loop_stops_cleanly_and_the_rerun_trains(
  corpus, tmp_path, monkeypatch, capsys, phase, signum, tokenizer
):
  workdir = str(tmp_path / "run")
  signal_at(phase, signum, monkeypatch.setattr)
  out = train(_config(corpus, tokenizer=tokenizer), workdir)
  assert out == {"interrupted": signum.name}
  lines = [line for line in capsys.readouterr().out.splitlines() if signum.name in line]
  assert len(lines) == 1 and "run the same command" in lines[0], lines
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing trained
  assert not os.listdir(os.path.join(workdir, "checkpoints")) if phase == "build" else True
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]  # no half-written files
  monkeypatch.undo()
  train(_config(corpus, tokenizer=tokenizer), workdir, verbose=False)
  assert _steps(workdir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_in_the_loop_saves_a_checkpoint_that_resumes_exactly(corpus, tmp_path, monkeypatch):
  straight = str(tmp_path / "straight")
  train(_config(corpus, steps=6), straight, verbose=False)
  stopped = str(tmp_path / "stopped")
  signal_at("step3", signal.SIGTERM, monkeypatch.setattr)
  out = train(_config(corpus, steps=6), stopped, verbose=False)
  assert out["interrupted"] == "SIGTERM" and _steps(stopped) == [1, 2, 3]
  assert os.listdir(os.path.join(stopped, "checkpoints")) == ["3"]
  monkeypatch.undo()
  train(_config(corpus, steps=6), stopped, verbose=False)
  losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(w)]
  assert losses(stopped) == losses(straight)  # bit for bit on CPU


_CLI = """
import signal, sys
sys.path.insert(0, {tests!r})
from test_interrupts import signal_at
from llm_mp import cli
if sys.argv[1] != "none":
  signal_at(sys.argv[1], getattr(signal, sys.argv[2]))
sys.exit(cli.main(sys.argv[3:]))
"""


def _cli(phase, signame, workdir, corpus, *overrides):
  """``llm-mp train`` in a fresh process that signals itself at ``phase``."""
  argv = ["train", "--workdir", workdir, "--preset", "tiny", "--data", corpus]
  argv += ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.sample_tokens=0"]
  argv += ["model.n_layers=1", "model.d_model=32", "model.max_len=16", "data.seq_len=16"]
  argv += ["model.vocab_size=320"]  # room for the BPE case's 300 tokens
  return subprocess.run(
    [sys.executable, "-c", _CLI.format(tests=os.path.join(ROOT, "tests")), phase, signame]
    + argv
    + list(overrides),
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
    timeout=300,
    check=False,
  )


@pytest.mark.slow  # two fresh processes
@pytest.mark.parametrize(
  "phase, signame, overrides, says",
  [
    ("compile", "SIGINT", (), "SIGINT: checkpoint saved at step 1"),
    (
      "tokenizer",
      "SIGTERM",
      ("data.tokenizer=bpe", "data.bpe_vocab_size=300"),
      "SIGTERM during data preparation",
    ),
  ],
  ids=["sigint-compile", "sigterm-bpe-training"],
)
def test_the_cli_stops_with_one_line_and_exit_130_then_resumes(
  corpus, tmp_path, phase, signame, overrides, says
):
  workdir = str(tmp_path / "run")
  r = _cli(phase, signame, workdir, corpus, *overrides)
  assert r.returncode == 130, r.stderr[-2000:]
  assert "Traceback" not in r.stderr + r.stdout
  assert says in r.stdout, r.stdout[-2000:]
  rerun = _cli("none", signame, workdir, corpus, *overrides)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert ("resumed from step 1" in rerun.stdout) == (phase == "compile")
  assert _steps(workdir) == [1, 2, 3]


_HOLDER = """
import sys, time
from llm_mp.rundir import workdir_lock
with workdir_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_the_workdir_lock_holds_across_processes_and_dies_with_a_killed_holder(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, workdir],
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):
      with workdir_lock(workdir):
        pass
  finally:
    holder.kill()  # SIGKILL: no cleanup code runs in the holder
    holder.wait()
  assert holder.returncode == -signal.SIGKILL
  with workdir_lock(workdir):  # the kernel dropped the lock with the dead process
    pass
