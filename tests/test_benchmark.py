"""The benchmark: builds a preset through the builder, times llm_mp's own
train_step, streams a line per phase, prints JSON; ``llm-mp bench`` runs it,
``python -m experiments.benchmark --suite`` tabulates several."""

import json

import jax
import numpy as np
import pytest

from experiments import benchmark as bench_suite
from llm_mp import allocator, benchmark, cli
from llm_mp.builder import build_recipe
from llm_mp.config import apply_overrides
from llm_mp.presets import get_preset
from llm_mp.state import make_init_fn
from llm_mp.step import make_train_step
from llm_mp.tasks import task_spec

ARGS = [
  "--preset",
  "nanogpt_cpu",
  "--precision",
  "fp32",
  "--steps",
  "2",
  "--warmup",
  "1",
  "model.n_layers=1",
  "train.batch_size=2",
]


@pytest.mark.slow
def test_bench_streams_phases_then_json_and_times_the_real_step(capsys):
  assert cli.main(["bench", *ARGS]) == 0  # through the installed command's parser
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(": ")[1].split(" ")[0] for line in lines[:3]] == ["state", "step", "2"]
  result = json.loads(lines[-1])
  assert result["batch"] == 2 and result["seq_len"] == 64 and result["precision"] == "fp32"
  assert result["init_s"] > 0 and result["compile_s"] > 0
  # The reported loss is that of the train step users train with, after 1 + 2
  # steps on the fixed batch (numpy seed 0), computed here independently.
  config = apply_overrides(get_preset("nanogpt_cpu"), ["model.n_layers=1", "train.batch_size=2"])
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task))
  batch = task_spec(config).synthetic_batch(config, 2)
  for _ in range(3):
    state, metrics = step(state, batch)
  np.testing.assert_allclose(result["loss"], float(metrics["loss"]), atol=1e-5)


@pytest.mark.parametrize(
  "preset, overrides",
  [
    ("encoder_tiny", ()),  # mlm: the byte tokenizer's ids stand in for the run's
    ("encoder_tiny", ("train.task=classify", "model.n_classes=3")),
    ("seq2seq_tiny", ("data.target_len=8", "model.n_decoder_layers=1")),
  ],
)
@pytest.mark.slow
def test_bench_times_every_task_on_its_own_synthetic_batch(capsys, preset, overrides):
  args = ["--preset", preset, "--steps", "1", "--warmup", "0", "train.batch_size=2"]
  tiny = ["model.n_layers=1", "data.seq_len=16"]
  assert cli.main(["bench", *args, *tiny, *overrides]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["preset"] == preset and np.isfinite(result["loss"])


def test_tune_malloc_applies_once_unless_the_user_set_the_variables(monkeypatch):
  monkeypatch.setattr(allocator, "_malloc_tuned", False)
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
  assert allocator.tune_malloc() is False  # the user's own setting wins
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
  assert allocator.tune_malloc() is True  # glibc's mallopt accepted both thresholds
  assert allocator.tune_malloc() is True


def test_suite_table_lists_every_run(monkeypatch):
  fake = dict(
    ms_per_step=10.0, tokens_per_s=1000.0, mfu_spec=None, init_s=1.0, compile_s=2.0, device="cpu"
  )
  monkeypatch.setitem(bench_suite.SUITES, "test", [("tiny", "fp32", ()), ("tiny", "bf16", ())])
  monkeypatch.setattr(benchmark, "run", lambda *a, **k: dict(fake))
  table = bench_suite.suite_table("test", 1, 0, reference="/nonexistent/torch_gpt.py")
  rows = [line for line in table.splitlines() if line.startswith("| llm_mp")]
  assert rows == [
    "| llm_mp tiny fp32  | 10.0 | 1,000 | - | - | 1.0 | 2.0 |",
    "| llm_mp tiny bf16  | 10.0 | 1,000 | - | - | 1.0 | 2.0 |",
  ]
