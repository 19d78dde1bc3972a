"""Every command on the runs it may be given: a converted (quantised, low-rank) run that
``export-hf`` and ``diagnose`` cannot read is refused in one line; ``lowrank`` refuses a
rank that would grow the model and reports like ``quantize``; a format, freeze or
override pattern that reaches nothing is an error naming the nearest paths, before
anything is written; ``quantize`` of an MLM encoder run uses its tokenizer."""

import json
import os

import jax
import pytest

from llm_mp import cli
from llm_mp.builder import build_recipe
from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer
from llm_mp.lowrank_convert import convert_run
from llm_mp.presets import get_preset
from llm_mp.quantize import quantize_run
from llm_mp.rundir import write_run
from llm_mp.state import make_init_fn
from llm_mp.train import train

TINY = ["model.n_layers=3", "data.max_docs=100", "data.seq_len=32", "model.max_len=32"]
QUIET = ["train.log_every=20", "train.eval_every=20", "train.eval_batches=1"]


def _config(preset="tiny", *overrides):
  return apply_overrides(get_preset(preset), [*TINY, *QUIET, "train.sample_tokens=0", *overrides])


def _written_run(path, config):
  """A run directory of ``config`` with its initial parameters (no training)."""
  r = build_recipe(config, ByteTokenizer())
  params = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0)).params
  write_run(str(path), config, params, ByteTokenizer())
  return str(path)


def _fails(capsys, *argv):
  """The one stderr line of a command that exits 2."""
  assert cli.main(list(argv)) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if "Warning" not in line]
  assert len(err) == 1, err
  return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny decoder run (3 blocks, 20 steps) and its int8 and rank-8 conversions."""
  root = tmp_path_factory.mktemp("guards")
  run = str(root / "run")
  train(_config("tiny", "train.steps=20"), run, verbose=False)
  return {"run": run, "int8": quantize_run(run, "int8"), "lowrank": convert_run(run, 8)}


@pytest.mark.parametrize("kind, fmt", [("int8", "int8-weight"), ("lowrank", "lowrank:8")])
@pytest.mark.parametrize("command", ["export-hf", "diagnose"])
def test_a_converted_run_is_refused_in_one_line_by_commands_that_read_float_weights(
  trained, tmp_path, capsys, kind, fmt, command
):
  argv = [command, "--workdir", trained[kind]["out"]]
  argv += [str(tmp_path / "hf")] if command == "export-hf" else ["--out", str(tmp_path / "d")]
  line = _fails(capsys, *argv)
  assert line.startswith(f"llm-mp {command}: error: ")
  assert f"precision.formats={fmt}, not as float kernels" in line
  assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "d")


def test_lowrank_refuses_a_rank_at_or_above_min_k_n_and_reports_like_quantize(
  trained, tmp_path, capsys
):
  out = str(tmp_path / "big")
  line = _fails(capsys, "lowrank", "--workdir", trained["run"], "--rank", "100000", "--out", out)
  # tiny at d_model 128: the key/value kernels are [128, 64] (2 kv heads of 64)
  assert "--rank 100000 is at or above min(K, N) of 7 of the 7 kernels" in line
  assert line.endswith("use a rank below 64") and not os.path.exists(out)
  assert "--rank 64 is at or above min(K, N) of 2 of the 7" in _fails(
    capsys, "lowrank", "--workdir", trained["run"], "--rank", "64", "--out", out
  )
  argv = ["lowrank", "--workdir", trained["run"], "--rank", "4", "--out", out, "--eval"]
  assert cli.main(argv) == 0
  report = json.loads(capsys.readouterr().out)
  quantized = trained["int8"]
  shared = {"out", "format", "step", "source_step"}
  assert shared <= set(report) and shared <= set(quantized)
  assert (report["step"], report["source_step"], quantized["source_step"]) == (0, 20, 20)
  assert report["out"] == out and report["format"] == "lowrank:4"
  assert report["eval_before"]["step"] == 20 and report["eval_after"]["step"] == 0
  assert report["params_after"] < report["params_before"]


def test_quantize_of_a_model_no_format_reaches_is_an_error(tmp_path, capsys):
  one_block = _written_run(tmp_path / "one", _config("tiny", "model.n_layers=1"))
  line = _fails(capsys, "quantize", "--workdir", one_block, "--to", "int8")
  assert "precision.formats='int8-weight' reaches none of the 8 weight matmuls" in line
  assert "precision.format_edges=true" in line
  assert not os.path.exists(one_block + "-int8")
  line = _fails(capsys, "lowrank", "--workdir", one_block, "--rank", "4")
  assert "reaches none of the" in line and "precision.format_edges" in line


@pytest.mark.parametrize(
  "override, message",
  [
    (
      "precision.formats=fp8",
      "precision.formats='fp8' reaches none of the 8 weight matmuls: the first and last "
      "block of each stack and the heads keep their float weights unless "
      "precision.format_edges=true",
    ),
    (
      "train.freeze=embeds/*",
      "train.freeze: 'embeds/*' matches no parameter path of this model; nearest: 'embed'",
    ),
    (
      "precision.overrides=*mpl*=f32",
      "precision.overrides: '*mpl*' matches no module of this model; nearest: 'mlp'",
    ),
    (
      "precision.formats=*mpl*=int8",
      "precision.formats: '*mpl*' matches no weight matmul of this model; nearest: 'mlp'",
    ),
  ],
)
def test_a_pattern_that_reaches_nothing_stops_training_before_anything_is_written(
  tmp_path, capsys, override, message
):
  workdir = str(tmp_path / "run")
  line = _fails(capsys, "train", "--workdir", workdir, *TINY, "model.n_layers=1", override)
  assert message in line
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_start_up_says_how_many_parameters_are_frozen(tmp_path, capsys):
  config = _config("tiny", "model.n_layers=1", "train.steps=1", "train.freeze=embed/*")
  train(config, str(tmp_path / "run"))
  header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model:"))
  # the byte embedding table: 259 tokens padded to 320 (vocab_multiple 64), d_model 128
  assert " parameters (40,960 frozen)," in header


def test_quantize_of_an_mlm_encoder_run_reads_its_tokenizer(tmp_path):
  encoder = _written_run(tmp_path / "enc", _config("encoder_tiny"))
  report = quantize_run(encoder, "int8")
  assert report["sizes"]["tensors"] > 0 and os.path.isdir(report["out"])
