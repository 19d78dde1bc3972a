"""The fp8 format: e4m3/e5m2 rounding and saturation, delayed and current scaling, the
state in TrainState.model_state (train step, micro-batches, checkpoint, resume), and a
jaxpr check that the float8 casts sit in exactly the matmuls the format names."""

import collections
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import fp8_ops
from jax.extend import core as jax_core

from llm_mp import checkpoint, sharding
from llm_mp.builder import build_recipe
from llm_mp.config import (
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  PrecisionConfig,
  TrainConfig,
  apply_overrides,
)
from llm_mp.formats.fp8 import E4M3, E5M2, FP8_META, in_qdq, out_qdq
from llm_mp.inference import evaluate_run
from llm_mp.metrics import read_metrics
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.state import abstract_train_state, make_init_fn
from llm_mp.step import make_train_step
from llm_mp.tasks import apply_model
from llm_mp.train import train

FP8 = ("precision.formats=fp8", "precision.format_edges=true")
# Half an ulp relative to the value, for values in the normal range: 3 and 2 mantissa bits.
REL_BOUND = {E4M3: 2.0**-4, E5M2: 2.0**-3}


def _normal_range(q_dtype, n=4096, seed=0):
  """float32 ``[n]`` of random sign, log-uniform over the normal range of ``q_dtype``."""
  info = jnp.finfo(q_dtype)
  rng = np.random.default_rng(seed)
  logs = rng.uniform(np.log2(float(info.smallest_normal)), np.log2(float(info.max)), n)
  return jnp.asarray(rng.choice([-1.0, 1.0], n) * 2.0**logs, jnp.float32)


def _relative_error(y, x):
  return jnp.max(jnp.abs(y - x) / jnp.abs(x))


@pytest.mark.parametrize("q_dtype", [E4M3, E5M2])
def test_quantise_dequantise_error_is_half_an_ulp_and_large_values_saturate(q_dtype):
  x = _normal_range(q_dtype)
  one = jnp.ones((), jnp.float32)
  y = fp8_ops.qdq(x, q_dtype, one, jnp.float32)
  assert float(_relative_error(y, x)) <= REL_BOUND[q_dtype]
  assert float(_relative_error(y, x)) > REL_BOUND[q_dtype] / 2  # the bound is the tight one
  fp8_max = float(jnp.finfo(q_dtype).max)  # 448 (e4m3fn), 57344 (e5m2)
  big = jnp.array([fp8_max * 1.01, 1e30, -1e30], jnp.float32)
  np.testing.assert_array_equal(
    fp8_ops.qdq(big, q_dtype, one, jnp.float32), [fp8_max] * 2 + [-fp8_max]
  )


def test_current_scaling_maps_the_amax_to_fp8_max_and_rounds_within_the_bound():
  # Values spanning 2**-5..1 of the amax stay normal in e4m3 once scaled to amax -> 448.
  x = _normal_range(E4M3) * 2.0**-12  # amax ~ 0.11, most entries far below e4m3's normals
  one, empty = jnp.ones((), jnp.float32), jnp.zeros((1,), jnp.float32)
  y = in_qdq(E4M3, 0, True, x, one, empty)
  amax = jnp.max(jnp.abs(x))
  big = jnp.abs(x) >= amax * 2.0**-5
  assert float(_relative_error(y[big], x[big])) <= REL_BOUND[E4M3] * (1 + 1e-6)
  assert float(jnp.max(jnp.abs(y))) == pytest.approx(float(amax), rel=1e-6)
  # The gradient: straight through in the forward cast, e5m2 with its own amax backward.
  g = _normal_range(E5M2, seed=1) * 2.0**-30  # far below e5m2's normals unscaled
  _, vjp = jax.vjp(lambda y: out_qdq(E5M2, 0, True, y, one, empty), x)
  (gq,) = vjp(g)
  assert float(_relative_error(gq, g)) <= REL_BOUND[E5M2] * (1 + 1e-6)
  gx = jax.grad(lambda x: jnp.vdot(in_qdq(E4M3, 0, True, x, one, empty), g))(x)
  np.testing.assert_array_equal(gx, g)


def test_delayed_scaling_rolls_the_history_and_scales_from_its_max():
  """flax's convention (quantize divides by the scale): for step t,
  ``scale_t = max(history_{t-1}) / fp8_max * 2**margin`` (the previous scale while the
  history is all zero), then ``history_t = roll(history_{t-1}, -1)`` with ``amax_t`` at
  index 0; so history holds the last n amaxes, newest at 0, older ones oldest first."""
  n, margin = 4, 1
  amaxes = [3.0, 500.0, 0.25, 7.0, 2.0, 1.0]
  scale, history = jnp.ones((), jnp.float32), jnp.zeros((n,), jnp.float32)
  x = jnp.array([1.0, -0.5, 0.125], jnp.float32)
  expected_history = np.zeros(n, np.float32)
  for t, a in enumerate(amaxes):
    xt = x * a  # amax a
    expected_scale = (
      max(expected_history) / 448.0 * 2**margin if t else 1.0
    )  # step 0: empty history keeps the initial scale
    loss = lambda x, s, h: jnp.sum(in_qdq(E4M3, margin, False, x, s, h))
    y = in_qdq(E4M3, margin, False, xt, scale, history)
    gx, scale, history = jax.grad(loss, argnums=(0, 1, 2))(xt, scale, history)
    expected_history = np.roll(expected_history, -1)
    expected_history[0] = a
    np.testing.assert_array_equal(history, expected_history)
    assert float(scale) == pytest.approx(expected_scale, rel=1e-6)
    np.testing.assert_array_equal(y, fp8_ops.qdq(xt, E4M3, scale, jnp.float32))
    np.testing.assert_array_equal(gx, jnp.ones_like(xt))  # straight through
  assert sorted(np.asarray(history)) == sorted(amaxes[-n:])  # the last n steps, newest at 0
  assert float(history[0]) == amaxes[-1]
  # Step 1 scaled by a stale scale (from amax 3): 500 saturates at 448 * scale, finitely.
  scale1 = 3.0 / 448.0 * 2**margin
  y = fp8_ops.qdq(x * 500.0, E4M3, jnp.float32(scale1), jnp.float32)
  assert float(jnp.max(jnp.abs(y))) == pytest.approx(448.0 * scale1, rel=1e-6)


def test_the_output_gradient_is_e5m2_with_the_delayed_scale():
  scale, history = jnp.float32(1.0), jnp.array([2e-3, 5e-4, 0.0], jnp.float32)
  g = _normal_range(E5M2, seed=2) * 2.0**-24  # amax ~ 3.4e-3
  _, vjp = jax.vjp(lambda y, s, h: out_qdq(E5M2, 0, False, y, s, h), g, scale, history)
  gq, new_scale, new_history = vjp(g)
  assert float(new_scale) == pytest.approx(2e-3 / 57344.0, rel=1e-6)
  np.testing.assert_array_equal(new_history, jnp.array([jnp.max(jnp.abs(g)), 0.0, 2e-3]))
  np.testing.assert_array_equal(gq, fp8_ops.qdq(g, E5M2, new_scale, jnp.float32))
  # The largest gradients exceed the stale amax 2e-3: they saturate at 57344 * scale.
  assert float(jnp.max(jnp.abs(gq))) == pytest.approx(2e-3, rel=1e-6)


# --- a tiny decoder -------------------------------------------------------------------


def _config(*overrides):
  return apply_overrides(
    get_preset("tiny"),
    [
      "model.vocab_multiple=1",
      "model.vocab_size=64",
      "model.d_model=32",
      "model.n_layers=2",
      "model.n_heads=2",
      "model.n_kv_heads=1",
      "model.max_len=32",
      "data.seq_len=32",
      "train.batch_size=8",
      "optim.lr=1e-2",
      "optim.warmup_steps=2",
      "precision.policy=bf16",
      *overrides,
    ],
  )


def _batch():
  """8 rows counting up from random starts, learnable so the loss falls fast: by 3 through
  tokens 0..31, or by 5 through 32..63. The mix is chosen so that each micro-batch of 4
  rows has a smaller amax than the other at some layer's input."""
  high = jnp.array([0, 0, 1, 1, 0, 1, 1, 0])[:, None]
  start = jax.random.randint(jax.random.key(1), (8, 1), 0, 32)
  tokens = (start + (3 + 2 * high) * jnp.arange(33)[None]) % 32 + 32 * high
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _run(config, state, steps):
  """``(recipe, losses [steps], states [steps + 1])`` of ``steps`` steps on :func:`_batch`."""
  r = build_recipe(config)
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task))
  losses, states = [], [state]
  for _ in range(steps):
    state, metrics = step(state, _batch())
    losses.append(float(metrics["loss"]))
    states.append(state)
  return r, losses, states


@pytest.fixture(scope="module")
def runs():
  """20 steps of bf16, fp8 delayed and fp8 current (every matmul in fp8), from the same
  initial parameters (initialised once: compiling is most of this file's time). The
  delayed run takes its batches in 2 micro-batches, which should change nothing but
  rounding."""
  configs = {
    "bf16": _config(),
    "delayed": _config(*FP8, "optim.grad_accum_steps=2"),
    "current": _config(*FP8, "precision.fp8_scaling=current"),
  }
  r = build_recipe(configs["delayed"])
  init = jax.jit(make_init_fn(r.model, r.tx, configs["delayed"]))(jax.random.key(0))
  assert set(init.model_state) == {FP8_META}
  return {
    name: _run(config, init if name == "delayed" else init.replace(model_state={}), 20)
    for name, config in configs.items()
  }


@pytest.mark.slow
def test_fp8_training_follows_bf16(runs):
  bf16 = np.array(runs["bf16"][1])
  assert bf16[-1] < 0.1 * bf16[0]  # 4.19 -> 0.33 (measured)
  for name in ("delayed", "current"):
    losses = np.array(runs[name][1])
    # Largest gap over the 20 steps, measured: 0.013 (delayed), 0.010 (current).
    np.testing.assert_allclose(losses, bf16, atol=0.03, err_msg=name)
    assert not np.array_equal(losses, bf16), name  # fp8 is in the loop
  assert runs["current"][2][-1].model_state == {}  # current scaling keeps no state


def test_delayed_scales_are_model_state_updated_by_the_step(runs):
  r, _, states = runs["delayed"]
  meta = states[1].model_state[FP8_META]["decoder"]["blocks_1"]["mlp"]["up"]
  # Step 1 ran on the initial scales (1.0) and recorded its amaxes at index 0.
  kernel = states[0].params["decoder"]["blocks_1"]["mlp"]["up"]["kernel"]
  amax = float(jnp.max(jnp.abs(kernel.astype(jnp.bfloat16))))
  assert float(meta["kernel_kernel_amax_history"][0]) == amax
  np.testing.assert_array_equal(meta["kernel_kernel_amax_history"][1:], 0.0)
  assert float(meta["kernel_kernel_scale"]) == 1.0
  later = states[3].model_state[FP8_META]["decoder"]["blocks_1"]["mlp"]["up"]
  # Step 3 scaled by the max of steps 1-2; the e5m2 gradient scale is tiny (grads ~1e-4).
  hist2 = states[2].model_state[FP8_META]["decoder"]["blocks_1"]["mlp"]["up"]
  for role, fp8_max in (("input", 448.0), ("kernel", 448.0), ("output_grad", 57344.0)):
    expected = float(jnp.max(hist2[f"kernel_{role}_amax_history"])) / fp8_max
    assert float(later[f"kernel_{role}_scale"]) == pytest.approx(expected, rel=1e-6), role
  assert float(later["kernel_output_grad_scale"]) < 1e-6
  assert r.precision.format_for("decoder/blocks_1/mlp/up") == "fp8"


def test_micro_batches_combine_the_new_amaxes_by_their_maximum(runs):
  r, _, states = runs["delayed"]
  inputs = _batch()["inputs"]
  _, seen = jax.jit(
    lambda v: r.model.apply(v, inputs, capture_intermediates=True, mutable=["intermediates"])
  )(states[0].variables)
  seen, meta = seen["intermediates"], states[1].model_state[FP8_META]
  # Each matmul's input is a norm's output [B, T, d]; step 1 recorded its amax at index 0.
  consumers = [(("final_norm",), ("lm_head",))]
  for i in (0, 1):
    block = ("decoder", f"blocks_{i}")
    consumers += [(block + ("attn_norm",), block + ("attn", m)) for m in ("query", "key", "value")]
    consumers += [(block + ("mlp_norm",), block + ("mlp", m)) for m in ("gate", "up")]
  short = set()  # the micro-batches whose own amax falls short of the batch's somewhere
  for norm, layer in consumers:
    x = functools.reduce(dict.get, norm, seen)["__call__"][0]
    recorded = float(functools.reduce(dict.get, layer, meta)["kernel_input_amax_history"][0])
    # The max over the two micro-batches is the whole batch's (a sum would exceed it).
    assert recorded == float(jnp.max(jnp.abs(x))), layer
    short |= {i for i, rows in enumerate((x[:4], x[4:])) if jnp.max(jnp.abs(rows)) < recorded}
  assert short == {0, 1}  # keeping either micro-batch's amaxes alone would fail


def test_evaluation_and_params_only_forwards_read_the_scales_without_writing(runs):
  r, _, states = runs["delayed"]
  state, batch = states[5], _batch()

  @jax.jit
  def forwards(variables):
    evaluated = apply_model(r.model, variables, batch["inputs"], rng=None)
    read_only = r.model.apply(variables, batch["inputs"])  # as generation reads them
    params_only = r.model.apply({"params": variables["params"]}, batch["inputs"])
    return evaluated, read_only, params_only

  (logits, _, _, written), read_only, params_only = forwards(state.variables)
  chex.assert_trees_all_equal(written, state.model_state)  # read, not updated
  np.testing.assert_array_equal(read_only, logits)
  # Without the collection (a params-only restore) the forward scales by the current amax.
  np.testing.assert_allclose(params_only, logits, atol=0.1)
  assert float(jnp.max(jnp.abs(params_only - logits))) > 0


def test_fp8_scales_survive_a_checkpoint_bit_for_bit(runs, tmp_path):
  r, _, states = runs["delayed"]
  state, mesh = states[20], sharding.make_mesh(r.config.mesh)
  abstract = abstract_train_state(r.model, r.tx, r.config, mesh, jax.random.key(0))
  assert jax.tree.structure(abstract.model_state) == jax.tree.structure(state.model_state)
  manager = checkpoint.make_manager(str(tmp_path))
  assert checkpoint.save(manager, 20, state, {"step": 20}, force=True)
  checkpoint.wait(manager)
  restored, _, step = checkpoint.restore_latest(str(tmp_path), abstract)
  assert step == 20
  for a, b in zip(jax.tree.leaves(restored.model_state), jax.tree.leaves(state.model_state)):
    assert a.dtype == b.dtype == jnp.float32
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  scales = [
    float(s)
    for p, s in jax.tree_util.tree_leaves_with_path(state.model_state)
    if p[-1].key.endswith("_scale")
  ]
  assert all(0 < s < 1 for s in scales)  # learnt, not the initial 1.0


# --- the float8 casts sit in exactly the named matmuls --------------------------------


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v


def _float8_casts(jaxpr, stack="", counts=None):
  """``{(module path, float8 dtype): count}`` of the casts to float8 in ``jaxpr``; the
  path is flax's name scope with the transformation prefix (``jvp(...)/``) dropped."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    scope = "/".join(s for s in (stack, str(eqn.source_info.name_stack)) if s)
    dtype = eqn.params.get("new_dtype")
    if eqn.primitive.name == "convert_element_type" and "float8" in str(dtype):
      counts[(scope.split("/", 1)[1], str(dtype))] += 1
    for sub in _sub_jaxprs(eqn):
      _float8_casts(sub, scope, counts)
  return counts


def _casts_in_a_training_gradient(config):
  r = build_recipe(config)
  tokens = _batch()["inputs"]
  v = jax.eval_shape(r.model.init, jax.random.key(0), tokens)

  def loss(params, meta):
    logits = r.model.apply({"params": params, FP8_META: meta}, tokens)
    return jnp.sum(logits.astype(jnp.float32))

  return _float8_casts(jax.make_jaxpr(jax.grad(loss, (0, 1)))(v["params"], v[FP8_META]).jaxpr)


def test_a_format_reaches_exactly_the_matmuls_it_names():
  casts = _casts_in_a_training_gradient(_config("precision.formats=*mlp*=fp8", FP8[1]))
  mlps = {f"decoder/blocks_{i}/mlp/{m}" for i in (0, 1) for m in ("gate", "up", "down")}
  # Forward: input and kernel to e4m3; backward: the output gradient to e5m2.
  expected = {(m, "float8_e4m3fn"): 2 for m in mlps} | {(m, "float8_e5m2"): 1 for m in mlps}
  assert dict(casts) == expected
  # The experts (weights [E, d, f], a batch axis) get them too; the router does not.
  moe = _config("precision.formats=*mlp=fp8", FP8[1], "model.n_experts=4")
  casts = _casts_in_a_training_gradient(moe)
  blocks = {f"decoder/blocks_{i}/mlp" for i in (0, 1)}
  # w_in, w_gate, w_out: 3 matmuls per MoE.
  expected = {(m, "float8_e4m3fn"): 6 for m in blocks} | {(m, "float8_e5m2"): 3 for m in blocks}
  assert dict(casts) == expected


# --- resume -----------------------------------------------------------------------------


def _resume_config(corpus):
  return Config(
    model=ModelConfig.gpt2(d_model=16, n_layers=1, n_heads=2, max_len=16),
    optim=OptimConfig(lr=3e-3, warmup_steps=1),
    data=DataConfig(paths=(corpus,), seq_len=16, val_fraction=0.0),
    precision=PrecisionConfig(formats="fp8", format_edges=True),
    train=TrainConfig(
      steps=6, batch_size=8, log_every=1, eval_every=100, ckpt_every=3, sample_tokens=0
    ),
  )


@pytest.mark.slow
def test_a_resumed_fp8_run_matches_an_uninterrupted_one(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n\n".join(f"Document {i}: the quick brown fox. " * 4 for i in range(12)))
  config = _resume_config(str(corpus))
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(config, straight, verbose=False)
  train(config, resumed, verbose=False, until=3)
  train(config, resumed, verbose=False)
  a = {r["step"]: r["loss"] for r in read_metrics(straight)}
  b = {r["step"]: r["loss"] for r in read_metrics(resumed)}
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert [a[s] for s in a] == [b[s] for s in a]  # exact on CPU


@pytest.mark.slow
def test_eval_of_a_delayed_scaling_run_equals_the_evaluation_inside_training(tmp_path):
  """``llm-mp eval`` loads the fp8 scales and amax histories with the parameters,
  so it computes the validation loss training computed at the same step."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n\n".join(f"Document {i}: the quick brown fox. " * 4 for i in range(12)))
  base = _resume_config(str(corpus))
  config = dataclasses.replace(
    base,
    data=dataclasses.replace(base.data, val_fraction=0.25),
    train=dataclasses.replace(base.train, eval_every=6),
  )
  workdir = str(tmp_path / "run")
  last = train(config, workdir, verbose=False)
  run = load_run(workdir)
  assert "fp8_meta" in run.model_state  # the delayed scales came back with the params
  evaluated = evaluate_run(workdir)
  assert evaluated["step"] == 6
  np.testing.assert_allclose(evaluated["val_loss"], last["val_loss"], rtol=1e-6)
