"""The train/eval step: loss, loss scaling and update skipping, accumulation, presets."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from llm_mp.builder import build_recipe
from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, PrecisionConfig, TrainConfig
from llm_mp.state import make_init_fn
from llm_mp.step import cross_entropy, make_eval_step, make_train_step

T = 16


def _config(layer_metrics=False, **precision_kw):
  return Config(
    model=ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=T),
    optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0),
    data=DataConfig(seq_len=T),
    train=TrainConfig(batch_size=8, layer_metrics=layer_metrics),
    precision=PrecisionConfig(**precision_kw),
  )


def _batch(b=8, seed=0, vocab=64):
  tokens = np.random.default_rng(seed).integers(0, vocab, (b, T + 1))
  return {
    "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
    "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    "segment_ids": jnp.ones((b, T), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T)),
  }


def _setup(config, precision="fp32", loss_scale=None):
  section = dataclasses.replace(
    config.precision, policy=precision, loss_scale=loss_scale or config.precision.loss_scale
  )
  config = dataclasses.replace(config, precision=section)
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task), donate_argnums=0)
  return r.model, state, step


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_cross_entropy_matches_numpy_with_ignored_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  targets[0, 1] = -1  # ignored
  mask = np.ones((2, 5), bool)
  mask[1, 4] = False  # padding
  nll, z, count = cross_entropy(
    jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask)
  )
  chex.assert_type([nll, z, count], jnp.float32)
  lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
  logz = np.log(np.exp(lg).sum(-1))
  keep = (targets >= 0) & mask
  ref = (logz - np.take_along_axis(lg, np.maximum(targets, 0)[..., None], -1)[..., 0])[keep]
  np.testing.assert_allclose(float(nll), ref.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(z), (logz**2)[keep].sum(), rtol=1e-5)
  assert float(count) == keep.sum()


@pytest.mark.slow
def test_nonfinite_gradients_skip_the_update_bit_for_bit():
  # fp16 activations overflow (max 65504) when the loss is scaled by 2^40.
  config = _config(loss_scale="dynamic", init_loss_scale=2.0**40)
  _, state, step = _setup(config, "fp16")
  before = _copy((state.params, state.opt_state))
  state, metrics = step(state, _batch())
  assert not bool(metrics["grads_finite"])
  chex.assert_trees_all_equal((state.params, state.opt_state), before)
  assert float(state.loss_scale.loss_scale) == 2.0**39  # halved
  assert int(state.skipped_steps) == 1 and int(state.step) == 1
  chex.assert_tree_all_finite(state.params)


@pytest.mark.slow
def test_dynamic_scale_grows_after_period_finite_steps():
  config = _config(loss_scale="dynamic", init_loss_scale=2.0**10, loss_scale_period=3)
  _, state, step = _setup(config, "fp16")
  scales = []
  for i in range(4):
    state, m = step(state, _batch(seed=i))
    assert bool(m["grads_finite"])
    scales.append(float(state.loss_scale.loss_scale))
  assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11]
  assert int(state.skipped_steps) == 0


def _train(config, precision, steps, loss_scale=None):
  _, state, step = _setup(config, precision, loss_scale)
  batch = _batch()
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state, losses


@pytest.mark.slow
def test_fp16_with_dynamic_scaling_matches_fp32_where_no_scaling_does_not():
  # With init_std=0.002 the backward pass's small activation gradients underflow
  # in fp16 (15% of the parameter gradients are exactly 0 without scaling, 0.04%
  # with it), and Adam then leaves those parameters where they were. Comparing
  # losses cannot tell (Adam's normalised steps give close curves either way);
  # the parameters' movement can.
  config = _config()
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_std=0.002))
  _, state0, _ = _setup(config, "fp32")
  p0 = np.asarray(ravel_pytree(state0.params)[0], np.float64)
  moved = {}
  for precision, scale in (("fp32", None), ("fp16", "dynamic"), ("fp16", "none")):
    state, _ = _train(config, precision, 5, loss_scale=scale)
    moved[scale] = np.asarray(ravel_pytree(state.params)[0], np.float64)
  dist = lambda scale: np.linalg.norm(moved[scale] - moved[None]) / np.linalg.norm(moved[None] - p0)
  # Measured: 0.03 with dynamic scaling (fp16 rounding), 0.29 without.
  assert dist("dynamic") < 0.1
  assert dist("none") > 0.2  # the setting does tell scaling from no scaling


@pytest.mark.slow
def test_fp16_with_tiny_static_scale_underflows():
  """Without a large enough scale, fp16 backprop flushes small gradients to zero."""
  config = _config(loss_scale="static", init_loss_scale=2.0**-14)
  _, state, step = _setup(config, "fp16", loss_scale="static")
  _, state32, step32 = _setup(_config(), "fp32")
  p0 = _copy(state.params)
  state, m = step(state, _batch())
  state32, _ = step32(state32, _batch())
  assert bool(m["grads_finite"])
  unchanged = np.mean(
    np.concatenate(
      [np.ravel(a == b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(p0))]
    )
  )
  unchanged32 = np.mean(
    np.concatenate(
      [np.ravel(a == b) for a, b in zip(jax.tree.leaves(state32.params), jax.tree.leaves(p0))]
    )
  )
  # Adam moves every parameter whose gradient is non-zero; fp32 moves ~all.
  assert unchanged32 < 0.01
  assert unchanged > 0.5, unchanged
  assert float(m["grad_zero_fraction"]) > 0.5  # the step reports the underflow itself


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "pure_bf16"])
@pytest.mark.slow
def test_every_preset_overfits_one_batch(precision):
  config = _config()
  _, losses = _train(config, precision, 60)
  assert losses[0] > 3.5  # ~log(64) at init
  assert losses[-1] < 1.5, losses[-1]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch():
  # SGD: the update is the gradient itself (Adam's ~sign(g) would amplify the
  # rounding of near-zero gradients that a different summation order gives).
  base = _config()
  base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, name="sgd", lr=0.5))
  accum = dataclasses.replace(base, optim=dataclasses.replace(base.optim, grad_accum_steps=4))
  s1, _ = _train(base, "fp32", 2)
  s4, _ = _train(accum, "fp32", 2)
  chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6)


def test_second_call_does_not_recompile():
  _, state, step = _setup(_config())
  state, _ = step(state, _batch())
  size = step._cache_size()
  state, _ = step(state, _batch(seed=1))
  assert step._cache_size() == size == 1


def test_state_dtypes_are_stable_across_steps():
  _, state, step = _setup(_config(), "pure_bf16")
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  state, _ = step(state, _batch())
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes


def test_eval_step_sums_match_train_loss():
  config = _config()
  model, state, step = _setup(config)
  batch = _batch()
  out = jax.jit(make_eval_step(model))(state.params, batch)
  _, m = step(state, batch)
  assert float(out["tokens"]) == 8 * T
  np.testing.assert_allclose(
    float(out["loss_sum"]) / float(out["tokens"]), float(m["loss"]), rtol=1e-6
  )


def test_layer_metrics_count_zero_gradients_per_layer():
  from llm_mp.step import zero_fraction_by_layer  # pylint: disable=import-outside-toplevel

  grads = {
    "embed": {"embedding": jnp.array([[0.0, 1.0], [0.0, 0.0]])},
    "decoder": {
      "blocks_0": {"attn": {"kernel": jnp.zeros((3,))}, "mlp": {"kernel": jnp.ones((1,))}},
      "blocks_1": {"mlp": {"kernel": jnp.array([0.0, 2.0])}},
    },
    "lm_head": {"kernel": jnp.ones((2,))},
  }
  out = {k: float(v) for k, v in zero_fraction_by_layer(grads).items()}
  assert out == {
    "grad_zero_fraction/embed": 0.75,
    "grad_zero_fraction/decoder/blocks_0": 0.75,
    "grad_zero_fraction/decoder/blocks_1": 0.5,
    "grad_zero_fraction/lm_head": 0.0,
  }
  config = _config(layer_metrics=True)
  _, state, step = _setup(config)
  _, m = step(state, _batch())
  assert {k for k in m if k.startswith("grad_zero_fraction/")} == {
    "grad_zero_fraction/embed",
    "grad_zero_fraction/decoder/blocks_0",
    "grad_zero_fraction/decoder/blocks_1",
    "grad_zero_fraction/final_norm",
    "grad_zero_fraction/pos_embed",
  }  # GPT-2 style: learned positions, tied head
