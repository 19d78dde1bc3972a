"""The training loop and the CLI: exact resume, interruption, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from llm_mp import cli
from llm_mp.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.metrics import read_metrics
from llm_mp.rundir import ConfigConflictError
from llm_mp.train import train

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n\n\n") * 3 + (
  "Pack my box with five dozen liquor jugs. " * 8 + "\n\n\n"
) * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  (d / "a.txt").write_text(TEXT, encoding="utf-8")
  (d / "b.jsonl").write_text(
    "\n".join(json.dumps({"text": f"Document number {i}. " * 10}) for i in range(20)),
    encoding="utf-8",
  )
  return str(d)


def _config(corpus, steps=12):
  return Config(
    model=ModelConfig.gpt2(d_model=32, n_layers=2, n_heads=2, max_len=32),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    data=DataConfig(paths=(corpus,), seq_len=32, val_fraction=0.2),
    train=TrainConfig(
      steps=steps,
      batch_size=8,
      log_every=1,
      eval_every=6,
      eval_batches=2,
      ckpt_every=4,
      keep_checkpoints=2,
      sample_tokens=0,
    ),
  )


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
  """Losses of an uninterrupted 12-step run, the reference of every resume test."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train(_config(corpus, 12), workdir, verbose=False)
  return _losses(workdir)


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(corpus, straight, tmp_path):
  resumed = str(tmp_path / "resumed")
  train(_config(corpus, 12), resumed, verbose=False, until=6)  # checkpoints at 4 and 6
  last = train(_config(corpus, 12), resumed, verbose=False)
  a, b = straight, _losses(resumed)
  assert sorted(a) == list(range(1, 13)) and sorted(b) == list(range(1, 13))
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # exact on CPU
  assert a[12] < a[1]
  assert "val_loss" in last and np.isfinite(last["val_ppl"])
  assert os.path.exists(os.path.join(resumed, "tokenizer.json"))
  assert os.listdir(os.path.join(resumed, "tensorboard"))


def _kill_after_logged_steps(workdir, n):
  """SIGINTs this process once ``n`` steps are in metrics.jsonl (inside the loop)."""

  def watch():
    for _ in range(6000):
      if len(read_metrics(workdir)) >= n:
        os.kill(os.getpid(), signal.SIGINT)
        return
      time.sleep(0.01)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_that_resumes_exactly(corpus, straight, tmp_path):
  stopped = str(tmp_path / "stopped")
  watcher = _kill_after_logged_steps(stopped, 3)
  out = train(_config(corpus, 12), stopped, verbose=False)
  watcher.join()
  assert out["interrupted"] == "SIGINT"
  assert len(read_metrics(stopped)) < 12
  train(_config(corpus, 12), stopped, verbose=False)
  a, b = straight, _losses(stopped)
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]


@pytest.mark.slow
@pytest.mark.multidevice
def test_resume_on_a_different_mesh(corpus, straight, tmp_path, monkeypatch):
  moved = str(tmp_path / "moved")
  # The first 8 steps on one device (the view of the tests not marked multidevice: the
  # programs `straight` compiled), checkpointed unsharded; the rest restores them sharded
  # over 2 x 4 devices. (Training on 8 devices matching 1 is test_sharding's.)
  with monkeypatch.context() as m:
    one = jax.devices()[:1]
    m.setattr(jax, "devices", lambda backend=None: one)
    train(_config(corpus, 12), moved, verbose=False, until=8)
  assert len(jax.devices()) == 8
  fsdp = dataclasses.replace(_config(corpus, 12), mesh=MeshConfig(data=2, fsdp=4))
  train(fsdp, moved, verbose=False)
  a, b = straight, _losses(moved)
  # Steps 9 to 12 ran on 2 x 4 devices, which sum gradients in their own order: fp32
  # rounding and not a different run.
  np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-4)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(corpus, straight, tmp_path):
  broken = str(tmp_path / "broken")
  train(_config(corpus, 12), broken, verbose=False, until=8)  # checkpoints at 4 and 8
  ckpt_dir = os.path.join(broken, "checkpoints", "8")
  for root, _, files in os.walk(ckpt_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.warns(
    UserWarning, match=r"checkpoint step 8 in .* is unreadable .*falling back to step 4"
  ):
    train(_config(corpus, 12), broken, verbose=False)
  assert straight[12] == _losses(broken)[12]


@pytest.fixture(scope="module")
def short(corpus, tmp_path_factory):
  """A 4-step run (one checkpoint, at step 4); tests that change it take a copy."""
  workdir = str(tmp_path_factory.mktemp("short") / "run")
  train(_config(corpus, 4), workdir, verbose=False)
  return workdir


def _copy(run, tmp_path):
  return shutil.copytree(run, str(tmp_path / "run"))


@pytest.mark.slow
def test_conflicting_workdir_config_is_rejected_without_damage(corpus, short, tmp_path):
  workdir = _copy(short, tmp_path)
  before = open(os.path.join(workdir, "config.json")).read()
  cfg = _config(corpus, 4)
  bigger = Config(
    model=ModelConfig.gpt2(d_model=64, n_layers=2, n_heads=2, max_len=32),
    optim=cfg.optim,
    data=cfg.data,
    train=cfg.train,
  )
  with pytest.raises(ConfigConflictError, match="model.d_model=32"):
    train(bigger, workdir, verbose=False)
  assert open(os.path.join(workdir, "config.json")).read() == before


def _cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.mark.slow
def test_cli_train_generate_eval(corpus, tmp_path, capsys):
  workdir = str(tmp_path / "cli")
  code, out, _ = _cli(
    [
      "train",
      "--workdir",
      workdir,
      "--data",
      corpus,
      "model.d_model=32",
      "model.n_layers=1",
      "model.max_len=32",
      "data.seq_len=32",
      "train.batch_size=8",
      "--steps",
      "3",
    ],
    capsys,
  )
  last = json.loads(out.strip().splitlines()[-1])
  assert code == 0 and last["loss"] > 0
  # fp32 params and AdamW's two fp32 moments, printed at start-up and kept in the metrics.
  assert "12.00 bytes per parameter" in out
  assert last["bytes_per_param"] == pytest.approx(12, abs=0.01)
  code, out, _ = _cli(
    [
      "generate",
      "--workdir",
      workdir,
      "--prompt",
      "The quick",
      "--max-new-tokens",
      "8",
      "--temperature",
      "0",
    ],
    capsys,
  )
  assert code == 0 and out.startswith("The quick") and len(out.strip()) > len("The quick")
  code, out, _ = _cli(["eval", "--workdir", workdir], capsys)
  result = json.loads(out)
  assert code == 0 and result["val_loss"] > 0 and result["val_ppl"] > 1
  code, _, err = _cli(
    ["generate", "--workdir", workdir, "--prompt", "x" * 40, "--max-new-tokens", "8"], capsys
  )
  assert code == 2 and "max_len" in err and len(err.strip().splitlines()) == 1
  code, _, err = _cli(["generate", "--workdir", workdir, "--prompt", "x" * 40], capsys)
  assert code == 2 and "prompt is 41 tokens" in err and "model.max_len=32" in err


def _tree(directory):
  """{path: (size, mtime_ns)} of every file and directory under ``directory``."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      st = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.mark.slow
def test_eval_and_generate_write_nothing_into_the_run(short, tmp_path, capsys):
  workdir = _copy(short, tmp_path)
  for name in os.listdir(os.path.join(workdir, "data")):  # no token cache to reuse either
    shutil.rmtree(os.path.join(workdir, "data", name))
  before = _tree(workdir)
  one = tmp_path / "one.txt"
  one.write_text("A single document, all of which counts. " * 4, encoding="utf-8")
  code, out, _ = _cli(["eval", "--workdir", workdir], capsys)
  assert code == 0 and json.loads(out)["val_tokens"] > 0
  code, out, _ = _cli(["eval", "--workdir", workdir, "--data", str(one)], capsys)
  # All of the one document counts: its bytes plus eos are targets (bos is not).
  assert code == 0 and json.loads(out)["val_tokens"] == len(one.read_text().strip()) + 1
  code, _, _ = _cli(
    ["generate", "--workdir", workdir, "--prompt", "The", "--max-new-tokens", "2"], capsys
  )
  assert code == 0 and _tree(workdir) == before


@pytest.mark.slow
def test_every_checkpoint_unreadable_is_one_line_saying_what_to_do(short, tmp_path, capsys):
  workdir = _copy(short, tmp_path)  # one checkpoint, at step 4
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  # One checkpoint: nothing to fall back to, so no warning, only the error.
  code, _, err = _cli(
    ["generate", "--workdir", workdir, "--prompt", "T", "--max-new-tokens", "2"], capsys
  )
  assert code == 2 and "step 4" in err and "train it again" in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_nanogpt_cpu_preset_trains_on_the_default_data(tmp_path, capsys):
  # batch_size=8: the 8 fake devices do not split 12 rows; the vocabulary is what failed.
  code, out, err = _cli(
    [
      "train",
      "--workdir",
      str(tmp_path / "run"),
      "--preset",
      "nanogpt_cpu",
      "--steps",
      "1",
      "train.batch_size=8",
      "train.eval_batches=1",
      "train.sample_tokens=0",
    ],
    capsys,
  )
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["val_loss"] > 0


@pytest.mark.parametrize(
  "args,needle",
  [
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["model.no_such_key=1"], "model.no_such_key"),
    (["--precision", "fp8"], "fp8"),
    (["--mesh", "data=3"], "data"),
    (["--preset", "gpt5"], "gpt5"),
  ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys):
  workdir = str(tmp_path / "bad")
  code, _, err = _cli(["train", "--workdir", workdir, "--steps", "1"] + args, capsys)
  assert code == 2
  assert needle in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_cli_non_utf8_file_names_file_and_offset(tmp_path, capsys):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"hello world, this is fine text\n\xff\xfe broken")
  code, _, err = _cli(["train", "--workdir", str(tmp_path / "w"), "--data", str(bad)], capsys)
  assert code == 2 and "bad.txt" in err and "31" in err
