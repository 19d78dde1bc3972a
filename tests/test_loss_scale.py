"""Loss scales: jit round-trips, dynamic growth/shrink, exact unscaling, bit-exact skipping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp.loss_scale import (
  DynamicLossScale,
  NoOpLossScale,
  StaticLossScale,
  all_finite,
  make_loss_scale,
  select_tree,
)


def _dynamic(scale=2.0**10, period=3, factor=2.0, min_loss_scale=1.0):
  return DynamicLossScale(
    jnp.float32(scale), jnp.int32(0), period=period, factor=factor, min_loss_scale=min_loss_scale
  )


def _run(scale, finite_flags):
  adjust = jax.jit(lambda s, f: s.adjust(f))
  for f in finite_flags:
    scale = adjust(scale, jnp.asarray(f))
  return scale


@pytest.mark.parametrize(
  "scale",
  [
    NoOpLossScale(),
    StaticLossScale(jnp.float32(8.0)),
    _dynamic(period=7, factor=3.0, min_loss_scale=4.0),
  ],
  ids=["none", "static", "dynamic"],
)
def test_every_loss_scale_survives_jit_with_its_fields(scale):
  out = jax.jit(lambda s: s)(scale)
  assert type(out) is type(scale)
  assert jax.tree.structure(out) == jax.tree.structure(scale)
  chex.assert_trees_all_equal(out, scale)
  if isinstance(scale, DynamicLossScale):
    assert (out.period, out.factor, out.min_loss_scale) == (7, 3.0, 4.0)
    chex.assert_type([out.loss_scale, out.counter], [jnp.float32, jnp.int32])


def test_dynamic_custom_min_is_kept_through_jitted_adjust():
  # jmp 0.0.4 would fall back to min_loss_scale=1 here.
  out = _run(_dynamic(scale=64.0, factor=2.0, min_loss_scale=16.0), [False] * 5)
  assert float(out.loss_scale) == 16.0


def test_dynamic_non_finite_halves_and_resets_counter():
  s = _run(_dynamic(scale=2.0**10, period=3), [True, True])
  assert int(s.counter) == 2 and float(s.loss_scale) == 2.0**10
  s = _run(s, [False])
  assert int(s.counter) == 0 and float(s.loss_scale) == 2.0**9
  chex.assert_type([s.loss_scale, s.counter], [jnp.float32, jnp.int32])


def test_dynamic_never_shrinks_below_min():
  s = _run(_dynamic(scale=4.0, min_loss_scale=1.0), [False] * 4)
  assert float(s.loss_scale) == 1.0


def test_dynamic_grows_after_period_finite_steps():
  scales = []
  s = _dynamic(scale=2.0**10, period=3)
  for f in [True] * 7:
    s = _run(s, [f])
    scales.append(float(s.loss_scale))
  assert scales == [2.0**10] * 2 + [2.0**11] * 3 + [2.0**12] * 2
  assert int(s.counter) == 1


def test_dynamic_growth_stays_finite():
  s = _run(_dynamic(scale=float(jnp.finfo(jnp.float32).max), period=1), [True])
  assert np.isfinite(float(s.loss_scale))


@pytest.mark.parametrize(
  "scale", [NoOpLossScale(), StaticLossScale(jnp.float32(8.0))], ids=["none", "static"]
)
def test_static_and_noop_never_change(scale):
  out = _run(scale, [False, True, False])
  chex.assert_trees_all_equal(out, scale)


@pytest.mark.parametrize("kind", ["none", "static", "dynamic"])
def test_scale_unscale_round_trip_is_exact_for_powers_of_two(kind):
  scale = make_loss_scale(kind, 2.0**15, 10)
  tree = {
    "w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32),
    "b": jnp.float32(-0.0),
  }
  back = jax.jit(lambda s, t: s.unscale(s.scale(t)))(scale, tree)
  chex.assert_trees_all_equal(back, tree)


@pytest.mark.parametrize("kind", ["none", "static", "dynamic"])
def test_unscale_returns_fp32_for_low_precision_grads(kind):
  scale = make_loss_scale(kind, 2.0**10, 10)
  g = jnp.asarray([[1024.0, -3.0, 60000.0]], jnp.float16)
  out = scale.unscale({"g": g, "h": g.astype(jnp.bfloat16)})
  chex.assert_type(jax.tree.leaves(out), jnp.float32)
  expected = np.asarray(g, np.float32) / float(scale.loss_scale)
  np.testing.assert_array_equal(out["g"], expected)


def test_scale_keeps_the_loss_dtype():
  loss = jnp.float32(0.5)
  out = make_loss_scale("dynamic", 2.0**15).scale(loss)
  chex.assert_type(out, jnp.float32)
  assert float(out) == 0.5 * 2.0**15


def test_make_loss_scale_kinds_and_error():
  assert isinstance(make_loss_scale("none", 1.0, 1), NoOpLossScale)
  assert isinstance(make_loss_scale("static", 1.0, 1), StaticLossScale)
  s = make_loss_scale("dynamic", 2.0**12, 50)
  assert isinstance(s, DynamicLossScale) and s.period == 50 and float(s.loss_scale) == 2.0**12
  with pytest.raises(ValueError, match=r"'bogus'.*\['none', 'static', 'dynamic'\]"):
    make_loss_scale("bogus", 1.0, 1)


def test_all_finite():
  tree = {"a": jnp.ones((3,)), "b": jnp.zeros((2,), jnp.float16)}
  assert bool(all_finite(tree))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    assert not bool(all_finite({**tree, "b": jnp.asarray([0.0, bad], jnp.float16)}))


def _bits(tree):
  return jax.tree.map(lambda x: np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}"), tree)


def _old_and_new():
  nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00123], np.uint32).view(np.float32)
  old = {
    "params": {
      "w": jnp.asarray([-0.0, 0.0, 1.5], jnp.float32),
      "h": jnp.asarray([-0.0, 2.0], jnp.bfloat16),
    },
    "count": jnp.int32(7),
  }
  new = {
    "params": {"w": jnp.asarray(nans), "h": jnp.asarray([0.0, jnp.nan], jnp.bfloat16)},
    "count": jnp.int32(8),
  }
  return old, new


class SelectTreeTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_rejected_step_keeps_old_tree_bit_for_bit(self):
    old, new = _old_and_new()
    out = self.variant(select_tree)(jnp.asarray(False), new, old)
    chex.assert_trees_all_equal(_bits(out), _bits(old))
    chex.assert_trees_all_equal_dtypes(out, old)

  @chex.variants(with_jit=True, without_jit=True)
  def test_accepted_step_takes_new_tree(self):
    old, new = _old_and_new()
    out = self.variant(select_tree)(jnp.asarray(True), new, old)
    chex.assert_trees_all_equal(_bits(out), _bits(new))

  @chex.variants(with_jit=True, without_jit=True)
  def test_follows_all_finite(self):
    old, new = _old_and_new()
    out = self.variant(lambda n, o: select_tree(all_finite(n), n, o))(new, old)
    chex.assert_trees_all_equal(_bits(out), _bits(old))

  def test_dtype_drift_fails_loudly(self):
    with pytest.raises(TypeError):
      select_tree(True, {"a": jnp.ones(2, jnp.float32)}, {"a": jnp.ones(2, jnp.bfloat16)})
