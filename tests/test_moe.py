"""The mixture of experts: capacity routing, drops, auxiliary losses, dtypes, scan, sharding.

Routing tests build the router by hand (``router.kernel = scale * I`` with
``d_model == n_experts``), so the router logits are ``scale * x`` and every
expected choice, slot and drop is known before the layer runs; references are
NumPy float64.
"""

import dataclasses

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import sharding
from llm_mp.config import MeshConfig, ModelConfig
from llm_mp.models import TransformerLM
from llm_mp.models.moe import MoE, expert_capacity
from llm_mp.precision import make_precision
from llm_mp.step import cross_entropy

E = 4
# d_model == n_experts, so a router kernel scale * I makes the logits scale * x.
CFG = ModelConfig.gpt2(
  vocab_size=61,
  d_model=E,
  n_heads=1,
  n_layers=1,
  d_ff=8,
  max_len=16,
  n_experts=E,
  expert_top_k=1,
  expert_capacity_factor=float(E),
)
COLLECTIONS = ["losses", "metrics", "intermediates"]
# fp32 against float64 NumPy through two small matmuls (d <= 8, f = 8).
ATOL = 1e-5


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _expert(params, i, x, mlp="gelu"):
  """Expert ``i`` on tokens ``x [..., d]`` in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k.startswith("w_")}
  h = x @ p["w_in"][i]
  h = _silu(x @ p["w_gate"][i]) * h if mlp == "swiglu" else _gelu(h)
  return h @ p["w_out"][i]


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _moe(cfg=CFG, scale=None, seed=0):
  """The layer and its params (float32); ``scale``: router kernel = scale * I."""
  model = MoE(cfg, make_precision("fp32"))
  x = jnp.zeros((1, 2, cfg.d_model))
  params = nn.unbox(compiled.init(model, jax.random.key(seed), x)["params"])
  if scale is not None:
    params["router"]["kernel"] = scale * jnp.eye(cfg.d_model, cfg.n_experts)
  return model, params


def _apply(model, params, x, mask=None):
  # Jitted: one compilation instead of one per op (the tests run on 2 shared cores).
  fn = jax.jit(lambda p, x, mask: model.apply({"params": p}, x, mask=mask, mutable=COLLECTIONS))
  y, state = fn(params, jnp.asarray(x, jnp.float32), mask)
  metrics = {k: v[0] for k, v in state["metrics"].items()}
  losses = {k: v[0] for k, v in state["losses"].items()}
  return np.asarray(y, np.float64), metrics, losses, state["intermediates"]


def _choice_rows(choices, d=E, high=3.0):
  """``[1, N, d]`` inputs whose logits (with kernel I) put token n's maximum at choices[n]."""
  x = np.zeros((1, len(choices), d))
  x[0, np.arange(len(choices)), choices] = high
  return x


def test_capacity_formula():
  assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
  assert expert_capacity(8, 4, 1, 1.0) == 2
  assert expert_capacity(8, 4, 2, 4.0) == 8  # 16 slots clipped to one per token
  assert expert_capacity(1, 8, 1, 0.5) == 1  # never zero


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.slow
def test_one_expert_with_room_for_every_token_is_the_dense_mlp(mlp):
  cfg = dataclasses.replace(CFG, d_model=8, n_experts=1, mlp=mlp, expert_capacity_factor=1.0)
  model, params = _moe(cfg)
  x = np.random.default_rng(0).normal(size=(2, 5, 8))
  y, metrics, _, _ = _apply(model, params, x)
  # One expert: softmax over one logit is 1, so the gate is exactly 1.
  np.testing.assert_allclose(y, _expert(params, 0, x, mlp), atol=ATOL)
  assert float(metrics["moe_dropped_fraction"]) == 0.0
  np.testing.assert_array_equal(metrics["moe_expert_load"], [1.0])


def test_top1_sends_each_token_to_its_argmax_expert_weighted_by_its_probability():
  scale = 2.0
  model, params = _moe(scale=scale)
  x = np.random.default_rng(1).normal(size=(2, 6, E))
  y, metrics, _, inter = _apply(model, params, x)
  probs = _softmax(scale * x)  # the router by hand
  best = x.argmax(-1)
  np.testing.assert_allclose(inter["router_probs"][0], probs, atol=1e-6)
  # Capacity factor E: room for every token, nothing dropped.
  assert float(metrics["moe_dropped_fraction"]) == 0.0
  ref = np.zeros_like(x)
  for b, t in np.ndindex(best.shape):
    ref[b, t] = probs[b, t, best[b, t]] * _expert(params, best[b, t], x[b, t])
  np.testing.assert_allclose(y, ref, atol=ATOL)
  np.testing.assert_allclose(
    metrics["moe_expert_load"], np.bincount(best.ravel(), minlength=E) / best.size, atol=1e-7
  )


def _gate1(x, scale):
  p = _softmax(scale * x)
  return p.max(-1)


def test_tokens_over_capacity_are_dropped_and_counted():
  # N = 8 tokens, top-1, factor 1: C = ceil(8 / 4) = 2 slots per expert.
  cfg = dataclasses.replace(CFG, expert_capacity_factor=1.0)
  model, params = _moe(cfg, scale=1.0)
  choices = [0, 0, 0, 1, 0, 2, 1, 0]  # expert 0 is chosen 5 times: tokens 2, 4, 7 overflow
  x = _choice_rows(choices)
  y, metrics, _, _ = _apply(model, params, x)
  kept = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
  gate = _gate1(x, 1.0)[0]
  for n, e in enumerate(choices):
    expected = gate[n] * _expert(params, e, x[0, n]) if kept[n] else np.zeros(E)
    np.testing.assert_allclose(y[0, n], expected, atol=ATOL, err_msg=f"token {n}")
  np.testing.assert_array_equal(y[0, ~kept], 0.0)  # dropped: exactly nothing added
  np.testing.assert_allclose(metrics["moe_dropped_fraction"], 3 / 8, rtol=1e-6)
  np.testing.assert_allclose(metrics["moe_expert_load"], [5 / 8, 2 / 8, 1 / 8, 0], rtol=1e-6)


def test_padding_is_never_routed_and_not_counted():
  cfg = dataclasses.replace(CFG, expert_capacity_factor=1.0)
  model, params = _moe(cfg, scale=1.0)
  choices = [0, 0, 0, 1, 0, 2, 1, 0]
  x = _choice_rows(choices)
  mask = jnp.array([[False, True, True, True, True, True, True, False]])
  y, metrics, _, _ = _apply(model, params, x, mask)
  # Token 0 is padding, so tokens 1 and 2 fill expert 0 and only token 4 overflows.
  kept = np.array([0, 1, 1, 1, 0, 1, 1, 0], bool)
  gate = _gate1(x, 1.0)[0]
  for n, e in enumerate(choices):
    expected = gate[n] * _expert(params, e, x[0, n]) if kept[n] else np.zeros(E)
    np.testing.assert_allclose(y[0, n], expected, atol=ATOL, err_msg=f"token {n}")
  np.testing.assert_allclose(metrics["moe_dropped_fraction"], 1 / 6, rtol=1e-6)
  np.testing.assert_allclose(metrics["moe_expert_load"], [3 / 6, 2 / 6, 1 / 6, 0], rtol=1e-6)
  p = _softmax(x[0, 1:7])
  f = np.bincount(np.array(choices[1:7]), minlength=E) / 6
  np.testing.assert_allclose(metrics["moe_aux_loss"], E * np.sum(f * p.mean(0)), rtol=1e-5)


def test_top2_first_choices_take_priority_over_earlier_second_choices():
  # N = 4, top-2, factor 0.5: C = ceil(0.5 * 2 * 4 / 4) = 1 slot per expert.
  cfg = dataclasses.replace(CFG, expert_top_k=2, expert_capacity_factor=0.5)
  model, params = _moe(cfg, scale=1.0)
  x = np.array(
    [
      [
        [2.0, 3.0, 0.0, -5.0],  # first 1, second 0
        [3.0, 0.0, 2.0, -5.0],  # first 0, second 2
        [-5.0, 0.0, 2.0, 3.0],  # first 3, second 2
        [-5.0, 0.0, 3.0, 2.0],
      ]
    ]
  )  # first 2, second 3
  y, metrics, _, _ = _apply(model, params, x)
  # Every expert is filled by a first choice, so every second choice is
  # dropped, including token 0's (expert 0), which comes before token 1's first choice.
  p = _softmax(x[0])
  top2 = np.sort(p, -1)[:, -2:].sum(-1)
  for n in range(4):
    e = int(x[0, n].argmax())
    np.testing.assert_allclose(
      y[0, n], p[n, e] / top2[n] * _expert(params, e, x[0, n]), atol=ATOL, err_msg=f"token {n}"
    )
  np.testing.assert_allclose(metrics["moe_dropped_fraction"], 0.5, rtol=1e-6)
  # Load counts the router's choices before the cut: expert 0 has token 1's
  # first and token 0's second, expert 2 token 3's first and two seconds.
  np.testing.assert_allclose(metrics["moe_expert_load"], [2 / 8, 1 / 8, 3 / 8, 2 / 8], rtol=1e-6)


def test_top2_with_room_mixes_both_experts_with_renormalised_gates():
  cfg = dataclasses.replace(CFG, expert_top_k=2, expert_capacity_factor=2.0)
  model, params = _moe(cfg, scale=1.5)
  x = np.random.default_rng(2).normal(size=(1, 5, E))
  y, metrics, _, _ = _apply(model, params, x)
  p = _softmax(1.5 * x[0])
  assert float(metrics["moe_dropped_fraction"]) == 0.0
  for n in range(5):
    first, second = np.argsort(p[n])[::-1][:2]
    g = p[n, [first, second]] / p[n, [first, second]].sum()
    ref = g[0] * _expert(params, first, x[0, n]) + g[1] * _expert(params, second, x[0, n])
    np.testing.assert_allclose(y[0, n], ref, atol=ATOL)


@pytest.mark.slow
def test_aux_and_z_losses_equal_their_formulas_and_drive_the_router_gradient():
  cfg = dataclasses.replace(CFG, expert_top_k=2, moe_aux_weight=0.1, moe_z_weight=0.01)
  model, params = _moe(cfg)
  rng = np.random.default_rng(3)
  w = rng.normal(size=(E, E))
  params["router"]["kernel"] = jnp.asarray(w, jnp.float32)
  x = rng.normal(size=(2, 5, E))
  _, metrics, losses, _ = _apply(model, params, x)

  xs = x.reshape(-1, E)
  logits = xs @ w
  p = _softmax(logits)  # (N, E)
  n = len(xs)
  f = np.bincount(p.argmax(-1), minlength=E) / n  # first choices only
  aux = E * np.sum(f * p.mean(0))
  lse = np.log(np.exp(logits).sum(-1))
  z = np.mean(lse**2)
  np.testing.assert_allclose(metrics["moe_aux_loss"], aux, rtol=1e-5)
  np.testing.assert_allclose(metrics["moe_z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(losses["moe_aux_loss"], 0.1 * aux, rtol=1e-5)
  np.testing.assert_allclose(losses["moe_z_loss"], 0.01 * z, rtol=1e-5)
  chex.assert_type([losses["moe_aux_loss"], losses["moe_z_loss"]], jnp.float32)

  def summed_losses(kernel):
    p_ = dict(params, router={"kernel": kernel})
    _, state = model.apply({"params": p_}, jnp.asarray(x, jnp.float32), mutable=["losses"])
    return sum(jax.tree.leaves(state["losses"]))

  grad = np.asarray(jax.jit(jax.grad(summed_losses))(params["router"]["kernel"]), np.float64)
  # By hand: d aux / d logit_nj = (E / N) p_nj (f_j - sum_e f_e p_ne) (f is a
  # constant count); d z / d logit_nj = (2 / N) lse_n p_nj.
  g_logits = (
    0.1 * E / n * p * (f[None] - (p * f[None]).sum(-1, keepdims=True))
    + 0.01 * 2 / n * lse[:, None] * p
  )
  expected = xs.T @ g_logits
  assert np.abs(expected).max() > 1e-3  # a real, non-zero gradient
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_router_runs_in_fp32_under_low_precision(precision):
  cfg = ModelConfig.gpt2(
    vocab_size=61,
    d_model=16,
    n_heads=2,
    n_layers=1,
    d_ff=32,
    max_len=16,
    n_experts=4,
    expert_top_k=2,
  )
  model = TransformerLM(cfg, make_precision(precision))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 8)), jnp.int32)
  params = nn.unbox(compiled.init(model, jax.random.key(0), tokens)["params"])
  _, state = jax.jit(
    lambda p: model.apply({"params": p}, tokens, capture_intermediates=True, mutable=COLLECTIONS)
  )(params)
  mlp = state["intermediates"]["decoder"]["blocks_0"]["mlp"]
  compute = make_precision(precision).compute_dtype
  chex.assert_type(mlp["router"]["__call__"][0], jnp.float32)  # the logits
  chex.assert_type([mlp["router_logits"][0], mlp["router_probs"][0]], jnp.float32)
  chex.assert_type(mlp["__call__"][0], compute)  # the experts stay in the compute dtype
  chex.assert_type(
    jax.tree.leaves(state["losses"]) + jax.tree.leaves(state["metrics"]), jnp.float32
  )


LM = ModelConfig.gpt2(
  vocab_size=64,
  d_model=16,
  n_heads=4,
  n_layers=2,
  d_ff=32,
  max_len=16,
  n_experts=4,
  expert_top_k=2,
  expert_capacity_factor=1.0,
)


@pytest.mark.slow
def test_scan_and_remat_stack_the_sown_values_over_layers():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 12)), jnp.int32)
  plain = TransformerLM(LM, make_precision("fp32"))
  params = nn.unbox(compiled.init(plain, jax.random.key(0), tokens)["params"])
  scanned = TransformerLM(
    dataclasses.replace(LM, scan_layers=True, remat="full"), make_precision("fp32")
  )
  blocks = [params["decoder"][f"blocks_{i}"] for i in range(LM.n_layers)]
  stacked = dict(
    params, decoder={"blocks": {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}}
  )

  def run(model, p):
    logits, state = model.apply({"params": p}, tokens, mutable=["losses", "metrics"])
    return logits, state

  logits, state = jax.jit(lambda p: run(plain, p))(params)
  s_logits, s_state = jax.jit(lambda p: run(scanned, p))(stacked)
  chex.assert_trees_all_close(s_logits, logits, atol=1e-5)  # fp32, same ops, other fusion
  for col in ("losses", "metrics"):
    per_layer = [state[col]["decoder"][f"blocks_{i}"]["mlp"] for i in range(LM.n_layers)]
    expected = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    chex.assert_trees_all_close(
      s_state[col]["decoder"]["blocks"]["block"]["mlp"], expected, atol=1e-6
    )
  assert s_state["metrics"]["decoder"]["blocks"]["block"]["mlp"]["moe_expert_load"][0].shape == (
    LM.n_layers,
    LM.n_experts,
  )
  assert (
    float(
      jnp.max(s_state["metrics"]["decoder"]["blocks"]["block"]["mlp"]["moe_dropped_fraction"][0])
    )
    > 0
  )  # factor 1 with random routing: some drops

  def aux(model, p):  # scanned, each leaf is [n_layers]: sum every element
    return sum(jnp.sum(v) for v in jax.tree.leaves(run(model, p)[1]["losses"]))

  g = jax.jit(jax.grad(lambda p: aux(plain, p)))(params)
  g_scanned = jax.jit(jax.grad(lambda p: aux(scanned, p)))(stacked)
  g_blocks = [g["decoder"][f"blocks_{i}"] for i in range(LM.n_layers)]
  chex.assert_trees_all_close(
    g_scanned["decoder"]["blocks"]["block"],
    jax.tree.map(lambda *a: jnp.stack(a), *g_blocks),
    atol=1e-6,
  )
  assert float(jnp.abs(g["decoder"]["blocks_0"]["mlp"]["router"]["kernel"]).max()) > 0


@pytest.mark.slow
@pytest.mark.multidevice
def test_experts_shard_on_a_mesh_with_the_single_device_loss():
  cfg = dataclasses.replace(LM, mlp="swiglu")
  model = TransformerLM(cfg, make_precision("fp32"))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 61, (8, 13)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  boxed = compiled.init(model, jax.random.key(0), batch["inputs"])["params"]
  params = nn.unbox(boxed)

  def loss_fn(p, batch):
    logits, state = model.apply({"params": p}, batch["inputs"], mutable=["losses", "metrics"])
    nll, _, count = cross_entropy(logits, batch["targets"], jnp.ones_like(batch["targets"]))
    return nll / count + sum(jnp.sum(v) for v in jax.tree.leaves(state["losses"])), state["metrics"]

  ref_loss, ref_metrics = jax.jit(loss_fn)(params, batch)

  mesh_cfg = MeshConfig(data=2, tensor=4)
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  sharded = jax.device_put(params, shardings)
  w_in = sharded["decoder"]["blocks_0"]["mlp"]["w_in"]
  assert w_in.sharding.spec[0] == "tensor"  # one expert per tensor shard
  assert w_in.addressable_shards[0].data.shape[0] == cfg.n_experts // 4
  loss, metrics = jax.jit(
    sharding.with_rules(loss_fn, mesh, rules),
    in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
  )(sharded, batch)
  # The same fp32 arithmetic with reductions split over devices: a few ulps.
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  chex.assert_trees_all_close(metrics, ref_metrics, atol=1e-6)
