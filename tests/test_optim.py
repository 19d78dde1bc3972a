"""optax chains from config: schedules, one step of each optimizer, decay mask, clipping."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_mp.config import OptimConfig
from llm_mp.optim import decay_mask, make_optimizer, make_schedule

LR, TOTAL, WARMUP, END = 1e-2, 100, 10, 0.1
# fp32 arithmetic against float64 closed forms: a few ulps of relative error.
RTOL = 1e-6


def _params():
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
    "blocks_0": {
      "attn": {"query": {"kernel": arr(3, 2), "bias": arr(2)}},
      "attn_norm": {"scale": arr(3), "bias": arr(3)},
    },
    "embed": {"embedding": arr(5, 3)},
    "pos_embed": {"pos_embedding": arr(4, 3)},
  }


DEFAULT_MASK = {
  "blocks_0": {
    "attn": {"query": {"kernel": True, "bias": False}},
    "attn_norm": {"scale": False, "bias": False},
  },
  "embed": {"embedding": False},
  "pos_embed": {"pos_embedding": False},
}


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _one_step(cfg, params, grads):
  tx, _ = make_optimizer(cfg, TOTAL)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_closed_form(schedule):
  cfg = OptimConfig(lr=LR, warmup_steps=WARMUP, schedule=schedule, end_lr_ratio=END)
  sched = make_schedule(cfg, TOTAL)
  frac = (55 - WARMUP) / (TOTAL - WARMUP)
  mid = {
    "cosine": LR * (END + (1 - END) * 0.5 * (1 + math.cos(math.pi * frac))),
    "linear": LR + (LR * END - LR) * frac,
    "constant": LR,
  }[schedule]
  end = LR if schedule == "constant" else LR * END
  for step, want in [
    (0, 0.0),
    (WARMUP // 2, LR / 2),
    (WARMUP, LR),
    (55, mid),
    (TOTAL, end),
    (TOTAL + 50, end),
  ]:
    np.testing.assert_allclose(
      float(sched(step)), want, rtol=RTOL, atol=1e-12, err_msg=f"step {step}"
    )


def test_schedule_without_warmup_starts_at_peak():
  cfg = OptimConfig(lr=LR, warmup_steps=0, schedule="cosine", end_lr_ratio=END)
  np.testing.assert_allclose(float(make_schedule(cfg, TOTAL)(0)), LR, rtol=RTOL)


def test_optimizer_follows_its_schedule():
  cfg = OptimConfig(
    name="sgd", lr=LR, momentum=0.0, warmup_steps=WARMUP, weight_decay=0.0, clip_norm=None
  )
  tx, sched = make_optimizer(cfg, TOTAL)
  params = _params()
  grads = _grads(params)
  state = tx.init(params)
  for count in range(3):
    updates, state = tx.update(grads, state, params)
    lr = sched(count)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g, lr=lr: -lr * g, grads), rtol=RTOL)


def _decayed(grads, params, wd):
  """g + wd * p on the default mask (float64)."""
  return jax.tree.map(
    lambda g, p, m: np.float64(g) + (wd * np.float64(p) if m else 0.0), grads, params, DEFAULT_MASK
  )


def _adam_first_step(g, eps):
  # mu_hat = g, nu_hat = g^2 after bias correction.
  return g / (np.abs(g) + eps)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop", "adagrad"])
def test_first_step_matches_closed_form(name):
  wd, eps, b2 = 0.1, 1e-8, 0.95
  cfg = OptimConfig(
    name=name,
    lr=LR,
    warmup_steps=0,
    schedule="constant",
    b2=b2,
    eps=eps,
    momentum=0.9,
    weight_decay=wd,
    clip_norm=None,
  )
  params = _params()
  grads = _grads(params)
  if name == "adamw":  # decoupled: -lr * (adam direction + wd * p) on decayed leaves
    want = jax.tree.map(
      lambda g, p, m: -LR * (_adam_first_step(np.float64(g), eps) + (wd * p if m else 0.0)),
      grads,
      params,
      DEFAULT_MASK,
    )
  else:  # L2: the optimizer sees g' = g + wd * p on decayed leaves
    direction = {
      "adam": lambda g: _adam_first_step(g, eps),
      "sgd": lambda g: g,  # momentum trace starts at g
      "rmsprop": lambda g: g / np.sqrt((1 - b2) * g**2 + eps),
      "adagrad": lambda g: g / np.sqrt(0.1 + g**2 + eps),  # optax's initial accumulator
    }[name]
    want = jax.tree.map(lambda g: -LR * direction(g), _decayed(grads, params, wd))
  updates = _one_step(cfg, params, grads)
  chex.assert_trees_all_close(updates, jax.tree.map(np.float32, want), rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop", "adagrad"])
def test_no_weight_decay_matches_optax_reference(name):
  cfg = OptimConfig(
    name=name, lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=None
  )
  ref = {
    "adamw": optax.adam(LR, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "adam": optax.adam(LR, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "sgd": optax.sgd(LR, momentum=cfg.momentum),
    "rmsprop": optax.rmsprop(LR, decay=cfg.b2, eps=cfg.eps, momentum=cfg.momentum),
    "adagrad": optax.adagrad(LR, eps=cfg.eps),
  }[name]
  tx, _ = make_optimizer(cfg, TOTAL)
  params = _params()
  state, ref_state = tx.init(params), ref.init(params)
  for seed in (1, 2, 3):
    grads = _grads(params, seed)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(updates, ref_updates, rtol=RTOL)
    params = optax.apply_updates(params, updates)


def test_decay_mask_defaults_exclude_norms_biases_embeddings():
  assert decay_mask(_params(), OptimConfig()) == DEFAULT_MASK


@pytest.mark.parametrize("flag", ["decay_norms", "decay_biases", "decay_embeddings"])
def test_decay_mask_includes_what_the_config_asks(flag):
  mask = decay_mask(_params(), OptimConfig(**{flag: True}))
  block = mask["blocks_0"]
  assert block["attn_norm"]["scale"] is (flag == "decay_norms")
  assert block["attn"]["query"]["bias"] is (flag == "decay_biases")
  # A norm's bias is a norm parameter: decay_biases alone leaves it out.
  assert block["attn_norm"]["bias"] is (flag == "decay_norms")
  assert mask["embed"]["embedding"] is (flag == "decay_embeddings")
  assert mask["pos_embed"]["pos_embedding"] is (flag == "decay_embeddings")
  assert block["attn"]["query"]["kernel"] is True


def test_decay_mask_sees_through_logical_boxes():
  boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, ("a",) * x.ndim), _params())
  mask = decay_mask(boxed, OptimConfig())
  assert nn.unbox(mask) == DEFAULT_MASK


def test_weight_decay_skips_masked_params():
  cfg = OptimConfig(
    name="sgd",
    lr=LR,
    warmup_steps=0,
    schedule="constant",
    momentum=0.0,
    weight_decay=0.5,
    clip_norm=None,
  )
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  updates = _one_step(cfg, params, zero)
  for (path, u), m in zip(
    jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(DEFAULT_MASK)
  ):
    assert bool(jnp.any(u != 0)) is m, jax.tree_util.keystr(path)


def test_clipping_limits_a_huge_gradient_to_clip_norm():
  cfg = OptimConfig(
    name="sgd",
    lr=1.0,
    warmup_steps=0,
    schedule="constant",
    momentum=0.0,
    weight_decay=0.0,
    clip_norm=0.5,
  )
  params = _params()
  grads = jax.tree.map(lambda g: 1e6 * g, _grads(params))
  updates = _one_step(cfg, params, grads)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 0.5, rtol=RTOL)
  # Direction kept: clipping is a single rescale of the whole tree.
  scale = 0.5 / float(optax.tree.norm(grads))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -scale * g, grads), rtol=RTOL)


def test_small_gradient_is_not_clipped():
  cfg = OptimConfig(
    name="sgd",
    lr=1.0,
    warmup_steps=0,
    schedule="constant",
    momentum=0.0,
    weight_decay=0.0,
    clip_norm=1e6,
  )
  params = _params()
  grads = _grads(params)
  chex.assert_trees_all_close(_one_step(cfg, params, grads), jax.tree.map(jnp.negative, grads))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop", "adagrad"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_state_and_updates_follow_param_dtype(name, dtype):
  cfg = OptimConfig(name=name)
  params = jax.tree.map(lambda p: p.astype(dtype), _params())
  grads = _grads(_params())  # fp32, as unscale returns them
  tx, _ = make_optimizer(cfg, TOTAL)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal_dtypes(new_state, state)
  float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  chex.assert_type(float_leaves, dtype)


@pytest.mark.parametrize("field, value", [("name", "lamb"), ("schedule", "step")])
def test_unknown_names_raise_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf"optim\.{field}='{value}'"):
    OptimConfig(**{field: value})
