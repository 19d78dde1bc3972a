"""A matmul format is one function and one registry line: a format defined here, outside
the package, computes its matmul, trains, resumes exactly and evaluates through the
ordinary entry points; and the registry's queries answer for the shipped formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llm_mp.builder import run_precision
from llm_mp.config import PrecisionConfig, apply_overrides
from llm_mp.formats import (
  FORMATS,
  Format,
  contract,
  parse_formats,
  register_format,
  state_collections,
  weight_only_formats,
  weight_param,
)
from llm_mp.inference import evaluate_run
from llm_mp.metrics import read_metrics
from llm_mp.models import Dense
from llm_mp.precision import make_precision
from llm_mp.presets import get_preset
from llm_mp.train import train

NAME = "bf16-weight-test"


def bf16_weight_matmul(module, x, weight, arg, options):
  """``x @ W`` with ``W`` rounded to bfloat16 and back, in ``x``'s dtype."""
  del arg, options
  w = weight_param(module, weight, weight.name, weight.shape, weight.init_std)
  w = w.astype(jnp.bfloat16).astype(jnp.float32).astype(x.dtype)
  return contract(x, w, len(weight.in_shape), len(weight.batch_shape))


@pytest.fixture(scope="module")
def bf16_weight():
  """The format registered for the module's tests, and unregistered after them."""
  entry = register_format(Format(NAME, bf16_weight_matmul))
  yield entry
  del FORMATS[NAME]


def test_the_registry_answers_for_the_shipped_formats():
  assert {"none", "fp8", "int8", "int8-weight", "int4-weight", "lowrank"} <= set(FORMATS)
  assert state_collections() == state_collections(overwrite=True) == ("fp8_meta",)
  assert state_collections(overwrite=False) == ()
  assert weight_only_formats() == ("int4-weight", "int8-weight")
  fields = set(PrecisionConfig.__dataclass_fields__)
  assert all(set(f.options) <= fields for f in FORMATS.values())


def test_register_format_refuses_a_taken_name_and_an_unknown_option():
  with pytest.raises(ValueError, match="'fp8' is already registered"):
    register_format(Format("fp8", bf16_weight_matmul))
  with pytest.raises(ValueError, match=r"unknown precision options \['rank'\]"):
    register_format(Format("other", bf16_weight_matmul, options=("rank",)))
  assert "other" not in FORMATS


def test_a_registered_format_computes_its_matmul(bf16_weight):
  layer = Dense((3, 4), ("embed", "heads", "kv"), make_precision(formats=parse_formats(NAME)))
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
  w = np.asarray(params["kernel"])  # (16, 3, 4)
  y = np.asarray(layer.apply({"params": params}, x))
  rounded = w.astype(ml_dtypes.bfloat16).astype(np.float32)
  want = np.einsum("btk,khd->bthd", x, rounded) + params["bias"]
  # fp32 products of 16 terms, summed in another order: a few ulps.
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert np.abs(want - np.einsum("btk,khd->bthd", x, w)).max() > 1e-5  # the rounding shows


@pytest.mark.slow
def test_a_registered_format_trains_resumes_exactly_and_evaluates(bf16_weight, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n\n".join(f"Document {i}: the quick brown fox. " * 4 for i in range(16)))
  config = apply_overrides(
    get_preset("tiny"),
    [
      f"data.paths={corpus}",
      "data.val_fraction=0.25",
      "model.vocab_multiple=1",
      "model.d_model=16",
      "model.n_layers=1",
      "model.n_heads=2",
      "model.n_kv_heads=1",
      "model.max_len=16",
      "data.seq_len=16",
      "train.steps=4",
      "train.batch_size=8",
      "train.log_every=1",
      "train.eval_every=4",
      "train.eval_batches=64",  # the whole validation split, as evaluate_run reads it
      "train.ckpt_every=2",
      "train.sample_tokens=0",
      "optim.warmup_steps=1",
      f"precision.formats={NAME}",
      "precision.format_edges=true",
    ],
  )
  assert run_precision(config).format_for("decoder/blocks_0/mlp/up") == NAME
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(config, straight, verbose=False)
  train(config, resumed, verbose=False, until=2)
  train(config, resumed, verbose=False)
  a = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
  b = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
  assert sorted(a) == sorted(b) == list(range(1, 5))
  assert [a[s] for s in a] == [b[s] for s in a]  # exact on CPU
  val = [r["val_loss"] for r in read_metrics(straight) if "val_loss" in r]
  evaluated = evaluate_run(straight)
  assert evaluated["step"] == 4
  # Evaluation after training computes what evaluation during training computed.
  np.testing.assert_allclose(evaluated["val_loss"], val[-1], rtol=1e-5)
