"""The model's numerics: references, masks, gradients, dtypes, errors."""

import dataclasses

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from llm_mp.config import ModelConfig
from llm_mp.models import TransformerLM, dot_product_attention
from llm_mp.precision import Precision, make_precision, precision_report

GPT2 = ModelConfig.gpt2(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=24)
LLAMA = ModelConfig.llama(
  vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=24
)
SINUSOIDAL = dataclasses.replace(GPT2, position="sinusoidal", mlp="relu")
# Capacity factor E / top_k: room for every token, so no drops and the layer is
# per-token (exactly causal); capacity routing itself is tested in test_moe.py.
MOE = dataclasses.replace(GPT2, n_experts=4, expert_top_k=2, expert_capacity_factor=2.0)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "sinusoidal": SINUSOIDAL, "moe": MOE}


def _tokens(b=2, t=16, vocab=61, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _init(cfg, precision="fp32", tokens=None):
  model = TransformerLM(cfg, make_precision(precision))
  tokens = _tokens() if tokens is None else tokens
  params = nn.unbox(compiled.init(model, jax.random.key(0), tokens)["params"])
  return model, params


def _f64_model(cfg):
  """The same architecture with every dtype float64 and no fp32 overrides."""
  f64 = jmp.Policy(jnp.float64, jnp.float64, jnp.float64)
  return TransformerLM(cfg, Precision("f64", f64))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_fp32_forward_matches_float64_reference(name):
  cfg = CONFIGS[name]
  model, params = _init(cfg)
  tokens = _tokens()
  logits = compiled.apply(model, {"params": params}, tokens)
  with jax.enable_x64(True):
    ref = compiled.apply(
      _f64_model(cfg), {"params": jax.tree.map(lambda p: p.astype(jnp.float64), params)}, tokens
    )
    assert ref.dtype == jnp.float64
    # fp32 matmuls over d=32..128 accumulate ~1e-6 relative error per op.
    np.testing.assert_allclose(
      np.asarray(logits, np.float64), np.asarray(ref), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("precision,tol", [("bf16", 0.06), ("fp16", 0.008), ("pure_bf16", 0.06)])
@pytest.mark.slow
def test_low_precision_forward_close_to_fp32(precision, tol):
  # The error is measured against the logits' own spread at init (std ~0.13):
  # an absolute bound like 0.05 would pass logits that are 40% wrong. Measured
  # max error / std: 0.019 (bf16, 8 mantissa bits), 0.0024 (fp16, 11 bits);
  # the bounds are ~3x those.
  model32, params = _init(GPT2)
  model, params_lp = _init(GPT2, precision)
  params_lp = jax.tree.map(lambda a, b: a.astype(b.dtype), params, params_lp)
  tokens = _tokens()
  ref = compiled.apply(model32, {"params": params}, tokens)
  out = compiled.apply(model, {"params": params_lp}, tokens)
  chex.assert_type(out, jnp.float32)  # logits leave the model in fp32 under every preset
  spread = float(jnp.std(ref))
  assert spread > 0.05  # the logits are not all alike (then any bound would be loose)
  chex.assert_trees_all_close(out, ref, atol=tol * spread, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "pure_bf16"])
def test_policy_dtypes_of_params_and_intermediates(precision):
  prec = make_precision(precision)
  model, params = _init(GPT2, precision)
  chex.assert_type(jax.tree.leaves(params), [prec.param_dtype] * len(jax.tree.leaves(params)))
  _, state = compiled.apply(
    model, {"params": params}, _tokens(), capture_intermediates=True, mutable=("intermediates",)
  )
  inter = state["intermediates"]
  c = prec.compute_dtype
  block = inter["decoder"]["blocks_0"]
  chex.assert_type(block["attn"]["query"]["__call__"][0], c)
  chex.assert_type(block["mlp"]["up"]["__call__"][0], c)
  chex.assert_type(block["__call__"][0], c)  # residual stream
  chex.assert_type(block["attn_norm"]["__call__"][0], c)  # norm output back in the stream dtype
  chex.assert_type(inter["__call__"][0], jnp.float32)  # logits


def _ops_dtypes(fn, *args):
  """{primitive name: set of output dtypes} over a function's jaxpr (recursively)."""
  found = {}

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for out in eqn.outvars:
        found.setdefault(eqn.primitive.name, set()).add(str(out.aval.dtype))
      for p in eqn.params.values():
        if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
          visit(p.jaxpr)
        elif hasattr(p, "eqns"):
          visit(p)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_norm_statistics_and_softmax_run_in_fp32_under_bf16():
  model, params = _init(GPT2, "bf16")
  ops = _ops_dtypes(lambda p, t: model.apply({"params": p}, t), params, _tokens())
  # Reductions are norm statistics and softmax sums; exp/max belong to softmax.
  assert ops["reduce_sum"] == {"float32"}, ops["reduce_sum"]
  assert ops["exp"] == {"float32"}
  assert ops["rsqrt"] == {"float32"}
  assert "bfloat16" in ops["dot_general"]  # the matmuls do run in bf16


def test_override_changes_exactly_the_named_modules():
  prec = make_precision("bf16", overrides="*mlp/up=c=f32,o=f32")
  model = TransformerLM(GPT2, prec)
  params = nn.unbox(compiled.init(model, jax.random.key(0), _tokens())["params"])
  _, state = compiled.apply(
    model, {"params": params}, _tokens(), capture_intermediates=True, mutable=("intermediates",)
  )
  block = state["intermediates"]["decoder"]["blocks_0"]
  chex.assert_type(block["mlp"]["up"]["__call__"][0], jnp.float32)
  chex.assert_type(block["mlp"]["down"]["__call__"][0], jnp.bfloat16)
  chex.assert_type(block["attn"]["query"]["__call__"][0], jnp.bfloat16)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_causality(name):
  model, params = _init(CONFIGS[name])
  tokens = _tokens(b=1)
  base = compiled.apply(model, {"params": params}, tokens)
  t = 9
  changed = compiled.apply(model, {"params": params}, tokens.at[0, t].set((tokens[0, t] + 1) % 61))
  np.testing.assert_array_equal(np.asarray(base[:, :t]), np.asarray(changed[:, :t]))
  assert not np.allclose(base[:, t:], changed[:, t:])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.slow
def test_packed_documents_do_not_see_each_other(name):
  model, params = _init(CONFIGS[name])
  a, b = _tokens(b=1, t=10, seed=1), _tokens(b=1, t=6, seed=2)
  row = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 10 + [2] * 6])
  positions = jnp.array([list(range(10)) + list(range(6))])
  packed = compiled.apply(model, {"params": params}, row, segment_ids=segments, positions=positions)
  alone_a = compiled.apply(model, {"params": params}, a)
  alone_b = compiled.apply(model, {"params": params}, b)
  chex.assert_trees_all_close(packed[:, :10], alone_a, atol=1e-5)
  chex.assert_trees_all_close(packed[:, 10:], alone_b, atol=1e-5)


@pytest.mark.slow  # float64 finite differences over the parameters
def test_gradient_matches_finite_differences_in_float64():
  cfg = dataclasses.replace(LLAMA, n_layers=1)
  _, params = _init(cfg)
  tokens = _tokens(b=1, t=8)
  with jax.enable_x64(True):
    model = _f64_model(cfg)
    p64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    @jax.jit
    def loss(p):
      logits = model.apply({"params": p}, tokens)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(p64)
    flat, unravel = ravel_pytree(p64)
    g_flat, _ = ravel_pytree(grads)
    idx = np.random.default_rng(0).choice(flat.size, 20, replace=False)
    eps = 1e-6
    for i in idx:
      e = jnp.zeros_like(flat).at[i].set(eps)
      fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / (2 * eps)
      np.testing.assert_allclose(g_flat[i], fd, rtol=1e-5, atol=1e-9)


def test_attention_matches_naive_softmax_reference():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 4, 8))
  k = rng.normal(size=(2, 7, 2, 8))  # grouped-query: 2 kv heads for 4 query heads
  v = rng.normal(size=(2, 7, 2, 8))
  out = dot_product_attention(
    jnp.asarray(q, jnp.float32),
    jnp.asarray(k, jnp.float32),
    jnp.asarray(v, jnp.float32),
    causal=True,
  )
  ref = np.zeros((2, 5, 4, 8))
  for h in range(4):
    kv = h // 2
    s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / np.sqrt(8)
    s = np.where(np.arange(7)[None, :] <= np.arange(5)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref[:, :, h] = np.einsum("bts,bsd->btd", p, v[:, :, kv])
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_scan_and_remat_give_the_same_logits_as_the_plain_stack():
  model, params = _init(GPT2)
  scanned = TransformerLM(
    dataclasses.replace(GPT2, scan_layers=True, remat="dots"), make_precision("fp32")
  )
  blocks = [params["decoder"][f"blocks_{i}"] for i in range(GPT2.n_layers)]
  stacked = dict(params)
  stacked["decoder"] = {"blocks": {"block": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}}
  tokens = _tokens()
  chex.assert_trees_all_close(
    compiled.apply(scanned, {"params": stacked}, tokens),
    compiled.apply(model, {"params": params}, tokens),
    atol=1e-5,
  )


@pytest.mark.parametrize(
  "kw,field",
  [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="tanh"), "mlp"),
    (dict(position="alibi"), "position"),
    (dict(attention_impl="flash"), "attention_impl"),
  ],
)
def test_bad_model_config_names_field_and_value(kw, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig(**kw)


def test_sequence_longer_than_max_len_is_rejected():
  model, params = _init(GPT2)
  with pytest.raises(ValueError, match="max_len=24"):
    model.apply({"params": params}, _tokens(t=25))


def test_unknown_precision_lists_valid_choices():
  with pytest.raises(ValueError, match="bf16"):
    make_precision("fp8")
  with pytest.raises(ValueError, match="valid"):
    make_precision("bf16", overrides="*norm*=float8")


def test_precision_report_lists_params_and_module_dtypes():
  model, params = _init(GPT2, "pure_bf16")
  report = precision_report(model, params, _tokens())
  assert report["params"]["decoder/blocks_0/attn/query/kernel"] == "bfloat16"
  mods = report["modules"]
  assert mods["decoder/blocks_0/attn_norm"] == "compute=float32, output=bfloat16, format=none"
  assert mods["decoder/blocks_1/mlp/up"] == "compute=bfloat16, output=bfloat16, format=none"
  assert mods[""] == "compute=bfloat16, output=float32, format=none"  # the model: logits in fp32


def _pad_rows(params, path, n_rows, axis, seed):
  """``params`` with the array at ``path`` padded to ``n_rows`` along ``axis`` by random
  values (not zeros, so only the mask can make them harmless)."""
  params = jax.tree.map(lambda x: x, params)  # a copy to edit
  node = params
  for key in path[:-1]:
    node = node[key]
  x = node[path[-1]]
  shape = list(x.shape)
  shape[axis] = n_rows - x.shape[axis]
  pad = jax.random.normal(jax.random.key(seed), shape, x.dtype)
  node[path[-1]] = jnp.concatenate([x, pad], axis=axis)
  return params


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # tied and untied heads
@pytest.mark.slow
def test_padded_vocabulary_leaves_loss_and_samples_unchanged(name):
  from llm_mp.generate import generate  # pylint: disable=import-outside-toplevel

  cfg = CONFIGS[name]
  padded = dataclasses.replace(cfg, vocab_multiple=64)
  assert padded.padded_vocab == 64
  tokens = _tokens()
  model, params = _init(cfg)
  big = _pad_rows(params, ("embed", "embedding"), 64, 0, seed=1)
  if not cfg.tie_embeddings:
    big = _pad_rows(big, ("lm_head", "kernel"), 64, 1, seed=2)
  logits = model.apply({"params": params}, tokens)
  padded_logits = TransformerLM(padded, make_precision("fp32")).apply({"params": big}, tokens)
  chex.assert_shape(padded_logits, (2, 16, 64))
  # Same real weights, same arithmetic for the real columns: exactly equal.
  np.testing.assert_array_equal(padded_logits[..., :61], logits)
  assert float(padded_logits[..., 61:].max()) <= -1e8
  targets = jnp.roll(tokens, -1, axis=1)
  nll = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1).mean()
  np.testing.assert_allclose(nll(padded_logits), nll(logits), rtol=1e-6)  # fp32 sum order
  prompt = tokens[:, :4]
  out = generate(cfg, make_precision("fp32"), params, prompt, 8, jax.random.key(3))
  out_padded = generate(padded, make_precision("fp32"), big, prompt, 8, jax.random.key(3))
  np.testing.assert_array_equal(out_padded, out)


def test_mask_padded_vocab_is_finite_in_fp16():
  from llm_mp.models.layers import mask_padded_vocab  # pylint: disable=import-outside-toplevel

  z = mask_padded_vocab(jnp.full((2, 8), 3.0, jnp.float16), 5)
  assert z.dtype == jnp.float16 and bool(jnp.isfinite(z).all())
  p = jax.nn.softmax(z.astype(jnp.float32))
  np.testing.assert_array_equal(p[:, 5:], 0.0)
  np.testing.assert_allclose(p[:, :5], 0.2, rtol=1e-6)
