"""Integer formats: fake quantisation and its straight-through gradient, per-channel and
per-group scales, int4 packing, int8 quantisation-aware training, weight-only int8/int4
runs written by ``llm-mp quantize`` (sizes, generation, perplexity)."""

import contextlib
import io
import itertools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llm_mp import cli
from llm_mp import generate as gen
from llm_mp.builder import build_recipe
from llm_mp.config import PrecisionConfig, apply_overrides
from llm_mp.formats import Weight, parse_formats, stored_bytes
from llm_mp.formats import int8 as q8
from llm_mp.inference import evaluate_run
from llm_mp.loss_scale import make_loss_scale
from llm_mp.models import Dense
from llm_mp.precision import make_precision
from llm_mp.presets import get_preset
from llm_mp.quantize import quantize_run
from llm_mp.rundir import load_run
from llm_mp.state import TrainState
from llm_mp.step import make_train_step
from llm_mp.train import train

T = 16


def _config(*overrides):
  """The tiny preset shrunk: 3 blocks, so the middle one is what formats reach by default."""
  return apply_overrides(
    get_preset("tiny"),
    [
      "model.vocab_multiple=1",
      "model.d_model=32",
      "model.n_layers=3",
      f"model.max_len={T}",
      f"data.seq_len={T}",
      *overrides,
    ],
  )


def test_fake_quant_gradient_is_identity_inside_the_clipping_range_and_zero_outside():
  scale = jnp.float32(0.01)  # the grid covers [-1.27, 1.27]
  x = jnp.linspace(-2.0, 2.0, 101, dtype=jnp.float32)
  g = jnp.asarray(np.random.default_rng(0).normal(size=101), jnp.float32)
  dx, dscale = jax.grad(lambda x, s: jnp.sum(g * q8.fake_quant(x, s, 8)), argnums=(0, 1))(x, scale)
  inside = np.abs(np.asarray(x)) <= 1.27
  assert 0 < inside.sum() < inside.size
  np.testing.assert_array_equal(dx, np.where(inside, g, 0.0))
  assert float(dscale) == 0.0  # the scale is measured, not learned
  np.testing.assert_allclose(q8.fake_quant(x, scale, 8)[~inside], np.sign(x[~inside]) * 1.27)


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_is_on_the_grid_within_half_a_step(bits):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 24)), jnp.float32)
  scale = q8.amax_scale(x, (0,), bits)  # per column
  chex.assert_shape(scale, (1, 24))
  np.testing.assert_allclose(scale[0], np.abs(np.asarray(x)).max(0) / q8.qmax(bits), rtol=1e-6)
  y = np.asarray(q8.fake_quant(x, scale, bits))
  steps = y / np.asarray(scale)
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # integers on the grid
  assert np.abs(steps).max() <= q8.qmax(bits) + 1e-4
  assert np.all(np.abs(y - np.asarray(x)) <= np.asarray(scale) / 2 * (1 + 1e-5))


def test_int8_weight_scales_are_per_output_channel_and_per_expert():
  w = np.random.default_rng(2).normal(size=(3, 4, 8, 6)).astype(np.float32)  # [E, *in, out]
  weight = Weight("w", (4, 8), (6,), ("expert", None, None, None), 0.02, batch_shape=(3,))
  q, scale = q8.quantize_weight(jnp.asarray(w), weight, 8, group_size=128)
  want_scale = np.abs(w).max(axis=(1, 2)) / 127  # (E, out): amax over the contracted axes
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  chex.assert_type(q, jnp.int8)
  np.testing.assert_array_equal(q, np.round(w / want_scale[:, None, None, :]))
  np.testing.assert_allclose(
    q8.dequantize_weight(q, scale, weight, jnp.float32),
    np.asarray(q, np.float32) * np.asarray(scale)[:, None, None, :],
    rtol=1e-7,
  )


def test_int4_weight_scales_are_per_group_of_input_rows():
  w = np.random.default_rng(3).normal(size=(4, 8, 6)).astype(np.float32)  # K = 32 rows
  weight = Weight("kernel", (4, 8), (6,), (None, None, None), 0.02)
  packed, scale = q8.quantize_weight(jnp.asarray(w), weight, 4, group_size=8)
  chex.assert_shape(packed, (16, 6))
  chex.assert_shape(scale, (4, 6))  # 32 rows / 8 per group
  groups = w.reshape(4, 8, 6)
  want_scale = np.abs(groups).max(axis=1) / 7
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  want_q = np.clip(np.round(groups / want_scale[:, None]), -7, 7)
  np.testing.assert_array_equal(q8.unpack_int4(packed, 0), want_q.reshape(32, 6))
  deq = q8.dequantize_weight(packed, scale, weight, jnp.float32)
  step = np.asarray(scale)[:, None]  # (groups, 1, out)
  np.testing.assert_allclose(deq, (want_q * step).reshape(w.shape), rtol=1e-7)
  assert np.all(np.abs(np.asarray(deq).reshape(groups.shape) - groups) <= step / 2 * (1 + 1e-5))


def test_int4_packing_round_trips_every_pair_of_values():
  pairs = np.array(list(itertools.product(range(-8, 8), repeat=2)), np.int8)  # (256, 2)
  for axis, q in ((0, pairs.reshape(-1)), (1, np.stack([pairs.reshape(-1)] * 3))):
    packed = q8.pack_int4(jnp.asarray(q), axis)
    chex.assert_type(packed, jnp.uint8)
    assert packed.shape[axis] == q.shape[axis] // 2
    np.testing.assert_array_equal(q8.unpack_int4(packed, axis), q)
  # Even positions in the low nibble, two's complement: [1, -1] -> 0xF1.
  assert int(q8.pack_int4(jnp.asarray([1, -1], jnp.int8), 0)[0]) == 0xF1


def test_quantised_tensors_are_at_least_3_5x_int8_and_6x_int4_smaller_than_fp32():
  weight = Weight("kernel", (256,), (512,), (None, None), 0.02)
  w = jax.random.normal(jax.random.key(0), weight.shape)
  fp32 = stored_bytes(w)
  assert fp32 / stored_bytes(q8.quantize_weight(w, weight, 8, 128)) >= 3.5  # scales included
  assert fp32 / stored_bytes(q8.quantize_weight(w, weight, 4, 128)) >= 6


@pytest.mark.parametrize("activations", ["tensor", "token"])
def test_int8_dense_matches_a_numpy_fake_quantised_matmul(activations):
  precision = make_precision(
    "fp32",
    formats=parse_formats("int8"),
    format_options=PrecisionConfig(int8_activations=activations),
  )
  layer = Dense(12, ("embed", "mlp"), precision, use_bias=False)
  x = np.random.default_rng(4).normal(size=(2, 5, 16)).astype(np.float32)
  x[0, 1] *= 30  # one outlier token: per-tensor scaling coarsens every other token's grid
  params = layer.init(jax.random.key(0), x)["params"]
  y = layer.apply({"params": params}, x)
  w = np.asarray(nn.unbox(params)["kernel"], np.float64)
  sw = np.abs(w).max(0) / 127  # per output column
  sx = np.abs(x).max(-1, keepdims=True) if activations == "token" else np.abs(x).max()
  sx = sx / 127
  want = (np.round(x / sx) * sx) @ (np.round(w / sw) * sw)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  plain = x @ w
  assert np.abs(want - plain).max() > 1e-3  # the quantisation shows in the reference


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny llama trained for a few steps."""
  root = tmp_path_factory.mktemp("int")
  corpus = root / "text.txt"
  docs = (f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(24))
  corpus.write_text("\n\n\n".join(docs))
  config = _config(
    f"data.paths={corpus}",
    "data.val_fraction=0.2",
    "train.steps=8",
    "train.batch_size=8",
    "train.log_every=100",
    "train.eval_every=100",
    "train.ckpt_every=100",
    "train.sample_tokens=0",
    "optim.warmup_steps=5",
    "precision.group_size=32",
  )
  run = str(root / "run")
  train(config, run, verbose=False)
  return run


@pytest.fixture(scope="module")
def quantized(trained_run):
  """``{"int8": report, "int4": report}``: int8 by :func:`quantize_run` with the
  evaluations before and after, int4 by ``llm-mp quantize`` and evaluated here."""
  reports = {"int8": quantize_run(trained_run, "int8", evaluate=True)}
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    assert cli.main(["quantize", "--workdir", trained_run, "--to", "int4"]) == 0
  reports["int4"] = json.loads(printed.getvalue())
  reports["int4"]["eval_before"] = reports["int8"]["eval_before"]
  reports["int4"]["eval_after"] = evaluate_run(reports["int4"]["out"])
  return reports


def _train_losses(config, params, steps):
  """Losses of ``steps`` steps from ``params`` (fresh Adam) on one batch, memorised."""
  r = build_recipe(config)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=r.tx.init(params),
    loss_scale=make_loss_scale("none"),
    rng=jax.random.key(0),
    skipped_steps=jnp.zeros((), jnp.int32),
  )
  state = jax.device_put(state, jax.devices()[0])  # all committed: the step compiles once
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task))
  tokens = np.random.default_rng(0).integers(0, 64, (8, T + 1))
  batch = {
    "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
    "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    "segment_ids": jnp.ones((8, T), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (8, T)),
  }
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return np.array(losses)


@pytest.mark.slow
def test_int8_qat_trains_as_far_as_fp32(trained_run):
  # Quantisation-aware fine-tuning of the trained run, against the same steps in fp32.
  config = _config("optim.warmup_steps=0", "optim.lr=3e-3", "optim.schedule=constant")
  # Every matmul in int8, the heads and the edge blocks included.
  qat = apply_overrides(config, ["precision.formats=int8", "precision.format_edges=true"])
  params = load_run(trained_run).params  # float weights: the parameters of both
  fp32, int8 = (_train_losses(c, params, 20) for c in (config, qat))
  assert not np.allclose(int8, fp32, rtol=1e-6)  # the format is in the loop
  assert fp32[-1] < fp32[0] - 1.0  # both runs learn the batch
  # Measured: final losses 0.003 apart (3.370 vs 3.374); 0.05 leaves room for rounding noise.
  np.testing.assert_allclose(int8[-1], fp32[-1], atol=0.05)


@pytest.mark.parametrize("to, ratio, rtol", [("int8", 3.5, 0.002), ("int4", 6.0, 0.02)])
@pytest.mark.slow
def test_quantize_stores_integers_and_keeps_the_perplexity(trained_run, quantized, to, ratio, rtol):
  report = quantized[to]
  assert report["out"] == f"{trained_run}-{to}"
  sizes = report["sizes"]
  assert sizes["tensors"] == 7  # the middle block's q, k, v, out, up, gate, down
  assert sizes["float_bytes"] / sizes["quantized_bytes"] >= ratio  # scales included
  before, after = report["eval_before"]["val_ppl"], report["eval_after"]["val_ppl"]
  # Measured on this run: +0.004% (int8), +0.03% (int4); the tolerances are 50x and 70x that.
  np.testing.assert_allclose(after, before, rtol=rtol)
  assert after != before  # the quantised weights are the ones evaluated
  stored = traverse_util.flatten_dict(load_run(report["out"]).params, sep="/")
  assert (
    stored["decoder/blocks_1/mlp/up/kernel_q"].dtype == {"int8": jnp.int8, "int4": jnp.uint8}[to]
  )
  assert "decoder/blocks_1/mlp/up/kernel" not in stored
  assert stored["decoder/blocks_0/mlp/up/kernel"].dtype == jnp.float32  # an edge block: kept


def test_eval_and_generate_read_the_quantized_run(trained_run, quantized, tmp_path, capsys):
  out = quantized["int8"]["out"]
  assert cli.main(["eval", "--workdir", out]) == 0
  ppl = json.loads(capsys.readouterr().out)["val_ppl"]
  assert ppl == pytest.approx(quantized["int8"]["eval_after"]["val_ppl"], rel=1e-6)
  assert cli.main(["generate", "--workdir", out, "--prompt", "the", "--max-new-tokens", "4"]) == 0
  assert capsys.readouterr().out.startswith("the")
  assert cli.main(["quantize", "--workdir", trained_run, "--to", "int4"]) == 2
  assert "already exists and is not empty" in capsys.readouterr().err
  assert cli.main(["quantize", "--workdir", out, "--to", "int4", "--out", str(tmp_path)]) == 2
  assert "already quantised" in capsys.readouterr().err
  with pytest.raises(ValueError, match="stores integer weights"):
    train(load_run(out).config, str(tmp_path / "train"), verbose=False)


def _numpy_dequantised(stored, float_params):
  """The float parameters that ``stored`` (an int8 or int4 run's) stands for, dequantised
  in NumPy: int8 ``q [*in, *out]`` times its scale ``[*out]``; int4 two values per byte
  along the input rows (even rows in the low nibble, two's complement), ``[K/2, *out]``,
  times one scale per group of rows, ``[K/group, *out]``; shaped as ``float_params``."""
  flat, shapes = traverse_util.flatten_dict(stored), traverse_util.flatten_dict(float_params)
  out = {}
  for key, value in flat.items():
    name = key[-1]
    if name.endswith("_q"):
      target = key[:-1] + (name[:-2],)
      scale = np.asarray(flat[key[:-1] + (name[:-2] + "_scale",)], np.float32)
      q = np.asarray(value)
      if q.dtype == np.uint8:
        nibbles = np.stack([q & 0xF, q >> 4], axis=1).astype(np.int8)  # (K/2, 2, *out)
        q = ((nibbles ^ 8) - 8).reshape((-1,) + q.shape[1:])  # (K, *out)
        q = q.reshape((scale.shape[0], -1) + q.shape[1:]) * scale[:, None]  # (groups, g, *out)
      else:
        q = q.astype(np.float32) * scale
      out[target] = jnp.asarray(q.reshape(shapes[target].shape), jnp.float32)
    elif not name.endswith("_scale"):
      out[key] = value
  return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("to", ["int8", "int4"])
@pytest.mark.slow
def test_weight_only_run_equals_the_float_model_with_dequantised_weights(
  trained_run, quantized, to
):
  quant_run, float_run = load_run(quantized[to]["out"]), load_run(trained_run)
  dequantised = _numpy_dequantised(quant_run.params, float_run.params)
  prompt = jnp.asarray([[1, 40, 41, 42], [1, 50, 51, 52]], jnp.int32)
  tokens = [
    gen.generate(
      run.config.model, run.precision, params, prompt, 12, jax.random.key(0), temperature=0.0
    )
    for run, params in ((quant_run, quant_run.params), (float_run, dequantised))
  ]
  np.testing.assert_array_equal(tokens[0], tokens[1])
  # The logits agree too, and the comparison can tell: the float weights give other logits.
  logits_quant = jax.jit(quant_run.model.apply)({"params": quant_run.params}, prompt)
  float_logits = jax.jit(float_run.model.apply)
  logits_deq = float_logits({"params": dequantised}, prompt)
  # Measured: identical (both the same fp32 matmuls), while the float weights move these
  # logits (|logits| <= 0.44) by up to 1.1e-3 (int8) and 1.6e-2 (int4).
  np.testing.assert_allclose(logits_quant, logits_deq, rtol=1e-6, atol=1e-6)
  assert np.abs(float_logits({"params": float_run.params}, prompt) - logits_deq).max() > 1e-4
