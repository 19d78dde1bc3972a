"""Every command on the runs it may be given: a converted (quantised, low-rank) run that
``export-hf`` and ``diagnose`` cannot read is refused in one line; ``lowrank`` refuses a
rank that would grow the model and reports like ``quantize``; a format, freeze or
override pattern that reaches nothing is an error naming the nearest paths, before
anything is written; ``quantize`` of an MLM encoder run uses its tokenizer. And the
small things: overrides after options, a missing ``--init-from`` run, checks before
work and no half-made run directory after a failed one, file modes, the diagnose
summary, float64 policies, the progress bar's loss scale."""

import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from llm_mp import cli
from llm_mp.builder import build_recipe
from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer
from llm_mp.metrics import bar_postfix
from llm_mp.precision import make_precision
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
  """One tiny decoder run (3 blocks, 20 steps), its int8 conversion and its rank-4 one,
  made by ``llm-mp lowrank --eval`` (the report it prints)."""
  root = tmp_path_factory.mktemp("guards")
  run, lowrank = str(root / "run"), str(root / "lowrank")
  train(_config("tiny", "train.steps=20"), run, verbose=False)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(["lowrank", "--workdir", run, "--rank", "4", "--out", lowrank, "--eval"]) == 0
  report = json.loads(printed.getvalue())
  return {"run": run, "int8": quantize_run(run, "int8"), "lowrank": report, "lowrank_out": lowrank}


@pytest.mark.parametrize("kind, fmt", [("int8", "int8-weight"), ("lowrank", "lowrank:4")])
@pytest.mark.parametrize("command", ["export-hf", "diagnose"])
@pytest.mark.slow
def test_a_converted_run_is_refused_in_one_line_by_commands_that_read_float_weights(
  trained, tmp_path, capsys, kind, fmt, command
):
  argv = [command, "--workdir", trained[kind]["out"]]
  argv += [str(tmp_path / "hf")] if command == "export-hf" else ["--out", str(tmp_path / "d")]
  line = _fails(capsys, *argv)
  assert line.startswith(f"llm-mp {command}: error: ")
  assert f"precision.formats={fmt}, not as float kernels" in line
  assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "d")


@pytest.mark.slow
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
  report = trained["lowrank"]  # `lowrank --rank 4 --eval`'s
  quantized = trained["int8"]
  shared = {"out", "format", "step", "source_step"}
  assert shared <= set(report) and shared <= set(quantized)
  assert (report["step"], report["source_step"], quantized["source_step"]) == (0, 20, 20)
  assert report["out"] == trained["lowrank_out"] and report["format"] == "lowrank:4"
  assert report["eval_before"]["step"] == 20 and report["eval_after"]["step"] == 0
  assert report["params_after"] < report["params_before"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_start_up_says_how_many_parameters_are_frozen(tmp_path, capsys):
  config = _config("tiny", "model.n_layers=1", "train.steps=1", "train.freeze=embed/*")
  train(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  header = out[out.index("model:") : out.index("mesh:")]
  # the byte embedding table: 259 tokens padded to 320 (vocab_multiple 64), d_model 128
  assert " parameters (40,960 frozen)," in header
  # The precision header lists the default overrides of the modules this model has.
  assert "  lm_head: " in header and "classifier" not in header and "router" not in header


@pytest.mark.slow
def test_quantize_of_an_mlm_encoder_run_reads_its_tokenizer(tmp_path):
  encoder = _written_run(tmp_path / "enc", _config("encoder_tiny"))
  report = quantize_run(encoder, "int8")
  assert report["sizes"]["tensors"] > 0 and os.path.isdir(report["out"])


def test_overrides_may_follow_options(tmp_path, capsys):
  # precision.formats after --steps reaches the config: its check fails as it should.
  argv = ["train", "--workdir", str(tmp_path / "run"), "model.n_layers=1", "--steps", "3"]
  assert "reaches none of the" in _fails(capsys, *argv, "precision.formats=fp8")
  assert _fails_usage(capsys, *argv, "stray").endswith("unrecognized arguments: stray")


def _fails_usage(capsys, *argv):
  """The error line of a command argparse rejects (exit 2)."""
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  assert e.value.code == 2
  return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_init_from_run_is_named_and_nothing_is_written(tmp_path, capsys):
  workdir, missing = str(tmp_path / "ft"), str(tmp_path / "nowhere")
  line = _fails(capsys, "train", "--workdir", workdir, "--init-from", missing, *TINY)
  assert line.endswith(f"train.init_from={missing}: no such run directory")
  assert not os.path.exists(workdir)


def test_a_data_check_that_fails_leaves_no_run_directory(tmp_path, capsys):
  labelled = tmp_path / "three.tsv"
  rows = [f"text {i}\t{'abc'[i % 3]}" for i in range(30)]
  labelled.write_text("\n".join(["text\tlabel", *rows]) + "\n")
  workdir = str(tmp_path / "run")
  argv = ["train", "--workdir", workdir, "--preset", "encoder_tiny", "--task", "classify"]
  line = _fails(capsys, *argv, "--data", str(labelled), "model.n_classes=2", "model.n_layers=1")
  assert "three.tsv:4: label 'c' makes 3 classes, more than model.n_classes=2" in line
  assert not os.path.exists(workdir)  # no lock, tokenizer, corpus.json or checkpoints/


def test_a_conversion_into_a_used_directory_fails_before_its_work(trained, tmp_path, capsys):
  used = tmp_path / "used"
  used.mkdir()
  (used / "file").write_text("x")
  for argv in (
    ["quantize", "--workdir", trained["run"], "--to", "int8", "--out", str(used)],
    ["lowrank", "--workdir", trained["run"], "--rank", "4", "--out", str(used)],
    ["export-hf", "--workdir", trained["run"], str(used)],
    ["import-hf", str(tmp_path / "nowhere"), "--workdir", str(used)],
  ):
    assert _fails(capsys, *argv).endswith(f"{used}: already exists and is not empty")


def test_run_files_are_readable_by_others_as_plain_files_are(trained):
  umask = os.umask(0)
  os.umask(umask)
  for name in ("tokenizer.json", "corpus.json", "config.json"):
    assert os.stat(os.path.join(trained["run"], name)).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.slow
def test_diagnose_prints_a_summary_before_the_paths(trained, tmp_path, capsys):
  argv = ["diagnose", "--workdir", trained["run"], "--out", str(tmp_path / "d")]
  assert cli.main([*argv, "--policies", "bf16", "--batch-size", "2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("run step 20 (fp32): loss ")
  assert lines[3].startswith("  gradients flush/overflow: fp16 ")
  assert lines[5].startswith("  bf16 vs float64: loss ")
  assert json.loads(lines[-1])["json"].endswith("diagnose.json")


def test_float64_policies_are_refused_unless_jax_computes_in_float64():
  with pytest.raises(ValueError, match="float64 needs JAX's 64-bit mode"):
    make_precision("p=f64")
  with pytest.raises(ValueError, match="override dtype 'f64': float64 needs"):
    make_precision("fp32", overrides="lm_head=f64")
  with jax.enable_x64(True):
    assert make_precision("p=f64,c=f64").compute_dtype == jnp.float64


def test_the_progress_bar_shows_a_loss_scale_only_where_the_run_scales_its_loss():
  metrics = {"loss": 2.0, "tokens_per_s": 100.0, "loss_scale": 1.0}
  assert bar_postfix(metrics, loss_scaled=False) == "loss 2.0000, 100 tok/s"
  assert bar_postfix(metrics) == "loss 2.0000, 100 tok/s, scale 1"


@pytest.mark.slow
def test_the_progress_bar_starts_after_the_first_step_so_its_eta_leaves_out_compilation(
  tmp_path, monkeypatch
):
  import llm_mp.train as train_module  # pylint: disable=import-outside-toplevel

  made = []
  real_bar, real_jit = train_module.progress_bar, train_module.sharding.jit_train_step
  calls = []

  def counting_jit(*args, **kwargs):
    step_fn = real_jit(*args, **kwargs)

    def counted(state, batch):
      calls.append(1)
      return step_fn(state, batch)

    return counted

  def recording_bar(total, initial, enabled=True):
    made.append((total, initial, len(calls)))
    return real_bar(total, initial, enabled=False)

  monkeypatch.setattr(train_module, "progress_bar", recording_bar)
  monkeypatch.setattr(train_module.sharding, "jit_train_step", counting_jit)
  run = str(tmp_path / "run")
  train(_config("tiny", "model.n_layers=1", "train.steps=3"), run, until=2)
  train(_config("tiny", "model.n_layers=1", "train.steps=3"), run)
  # (total, first step counted, step calls made when the bar was created): the bar is
  # created once the (compiling) first call of each session has returned.
  assert made == [(3, 1, 1), (3, 3, 3)]


def test_import_hf_of_a_truncated_checkpoint_names_the_file(tmp_path, capsys):
  src = tmp_path / "gpt2"
  shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "gpt2"), src)
  weights = src / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-1000])
  line = _fails(capsys, "import-hf", str(src), "--workdir", str(tmp_path / "run"))
  assert f"{weights}: truncated: tensor " in line and "fetch it again" in line
  assert not os.path.exists(tmp_path / "run")
