"""The CPU fast paths compute what the plain formulations they replace compute.

* ``formats.base.dense`` (``custom_vjp``: 2-D matmul backward, activation derivative
  taken once from the saved pre-activation) vs jax autodiff of
  ``act(dot_general(x, W) + b)``;
* ``Norm`` (rematerialised ``layers.normalize``) vs autodiff of ``normalize``;
* ``dot_product_attention`` (query heads of a group stacked as rows of 4-D
  batched matmuls) vs the 5-D grouped einsum it replaced.

Tolerances: fp32 within a few ulps of each gradient's largest entry (the same
products summed in another order), float64 within 1e-12, bf16/fp16 compute
within a few roundings of the fp32 reference.
"""

import dataclasses
import functools

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_mp.config import ModelConfig
from llm_mp.formats import base
from llm_mp.formats.base import dense
from llm_mp.models import TransformerLM, dot_product_attention, segment_mask
from llm_mp.models.layers import ACTIVATIONS, Dense, Norm, normalize
from llm_mp.precision import make_precision


def plain_dense(x, kernel, bias=None, *, n_in=1, out_dtype=None, activation=None):
  """The formulation ``dense`` replaces, differentiated by jax autodiff."""
  contract = tuple(range(x.ndim - n_in, x.ndim))
  y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))
  if bias is not None:
    y = y + bias
  y = y.astype(out_dtype or x.dtype)
  return y if activation is None else activation(y)


def plain_attention(q, k, v, mask=None, causal=False):
  """The 5-D grouped-query einsum formulation ``dot_product_attention`` replaced."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)  # (B, T, K, G, H)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=acc) * (h**-0.5)
  if causal:
    tril = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    mask = tril[None, None] if mask is None else mask & tril
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def _inputs(dtype, n_in=1, seed=0):
  """x [3, 5, *in], kernel [*in, 4, 6], bias [4, 6] and a cotangent [3, 5, 4, 6]."""
  rng = np.random.default_rng(seed)
  in_shape = (8,) if n_in == 1 else (2, 4)
  x = rng.normal(size=(3, 5) + in_shape)
  kernel = rng.normal(size=in_shape + (4, 6)) / np.sqrt(8)
  bias = rng.normal(size=(4, 6))
  ct = rng.normal(size=(3, 5, 4, 6))
  return tuple(jnp.asarray(a, dtype) for a in (x, kernel, bias, ct))


def _grads(fn, ct, *args, argnums=(0, 1, 2), **kw):
  """Gradients of ``<fn(*args, **kw), ct>`` wrt ``args[argnums]``."""
  loss = lambda *a: jnp.vdot(fn(*a, **kw).astype(ct.dtype), ct)
  return jax.grad(loss, argnums=argnums)(*args)


def _rel_err(a, b) -> float:
  """Largest absolute difference relative to the largest reference entry."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class DenseGradientTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(act=[None, "gelu", "relu", "swiglu"], n_in=[1, 2], use_bias=[True, False])
  def test_fp32_equals_autodiff(self, act, n_in, use_bias):
    x, kernel, bias, ct = _inputs(jnp.float32, n_in)
    bias = bias if use_bias else None
    kw = dict(n_in=n_in, activation=act and ACTIVATIONS[act])
    got = self.variant(lambda *a: _grads(dense, ct, *a, **kw))(x, kernel, bias)
    want = _grads(plain_dense, ct, x, kernel, bias, **kw)
    for g, w in zip(got, want):
      if w is None:
        self.assertIsNone(g)
        continue
      chex.assert_type(g, jnp.float32)
      # The same products summed in another order: a few ulps (2^-24) of the largest entry.
      self.assertLess(_rel_err(g, w), 1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(act=[None, "gelu"], n_in=[1, 2])
  def test_float64_equals_autodiff(self, act, n_in):
    with jax.enable_x64(True):
      x, kernel, bias, ct = _inputs(jnp.float64, n_in)
      kw = dict(n_in=n_in, activation=act and ACTIVATIONS[act])
      got = self.variant(lambda *a: _grads(dense, ct, *a, **kw))(x, kernel, bias)
      want = _grads(plain_dense, ct, x, kernel, bias, **kw)
      for g, w in zip(got, want):
        chex.assert_type(g, jnp.float64)
        self.assertLess(_rel_err(g, w), 1e-12)  # float64 ulp is 1.1e-16

  @parameterized.product(compute=["bf16", "fp16"], act=[None, "gelu"])
  def test_low_precision_compute_with_fp32_params(self, compute, act):
    """A Dense under ``p=f32,c=<compute>``: fp32 gradients near the fp32 reference."""
    x, kernel, bias, ct = _inputs(jnp.float32)
    act = act and ACTIVATIONS[act]
    policy = make_precision(f"p=f32,c={compute},o={compute}")
    layer = Dense((4, 6), ("embed", "heads", "kv"), policy, activation=act)

    def grads(fn):
      def loss(params, x):
        with _patched_dense(fn):
          return jnp.vdot(layer.apply({"params": params}, x).astype(jnp.float32), ct)

      g_params, g_x = jax.grad(loss, argnums=(0, 1))({"kernel": kernel, "bias": bias}, x)
      return g_x, g_params["kernel"], g_params["bias"]

    got, low = grads(dense), grads(plain_dense)
    ref = _grads(plain_dense, ct, x, kernel, bias, activation=act)
    chex.assert_type(got, jnp.float32)  # cast back to the fp32 inputs' and params' dtype
    # bf16 keeps 8 significant bits, fp16 11: rounded inputs, products and sums of
    # 8-30 terms stay within a few 2^-8 (2^-11) of the largest entry.
    tol = {"bf16": 3e-2, "fp16": 4e-3}[compute]
    for g, lo, r in zip(got, low, ref):
      self.assertLess(_rel_err(g, r), tol)
      self.assertLess(_rel_err(g, lo), tol)  # and as close to autodiff in the same dtype


class _patched_dense:
  """Context in which ``Dense`` layers call ``fn`` instead of ``formats.base.dense``."""

  def __init__(self, fn):
    self.fn = fn

  def __enter__(self):
    self.saved, base.dense = base.dense, self.fn

  def __exit__(self, *exc):
    base.dense = self.saved


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_grads_equal_autodiff_of_normalize(kind):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 2 + 1, jnp.float32)
  ct = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  norm = Norm(kind, make_precision("fp32"))
  params = nn.unbox(norm.init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  got = _grads(lambda p, x: norm.apply({"params": p}, x), ct, params, x, argnums=(0, 1))
  want = _grads(
    lambda p, x: normalize(x, p["scale"], p.get("bias"), kind, 1e-5), ct, params, x, argnums=(0, 1)
  )
  # Rematerialisation recomputes the same ops: equal up to XLA's fusion choices.
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "kv_heads,causal,segments",
  [(4, True, False), (2, True, True), (1, False, True), (2, False, False)],
)
@pytest.mark.slow
def test_attention_equals_grouped_einsum(kv_heads, causal, segments):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 6, 4, 8))
  k, v = rng.normal(size=(2, 2, 6, kv_heads, 8))
  ct = rng.normal(size=q.shape)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = segment_mask(jnp.asarray(seg), jnp.asarray(seg)) if segments else None
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.float64, 1e-12)):
    with jax.enable_x64(dtype == jnp.float64):
      args = [jnp.asarray(a, dtype) for a in (q, k, v)]
      ct_ = jnp.asarray(ct, dtype)
      # Jitted whole: op-by-op dispatch would compile every primitive separately.
      fast, plain = (
        jax.jit(lambda *a, f=f: f(*a, mask=mask, causal=causal))
        for f in (dot_product_attention, plain_attention)
      )
      out, ref = fast(*args), plain(*args)
      chex.assert_type(out, dtype)
      assert _rel_err(out, ref) < tol
      got, want = (jax.jit(functools.partial(_grads, f))(ct_, *args) for f in (fast, plain))
      for g, w in zip(got, want):
        assert _rel_err(g, w) < tol


TINY = ModelConfig.gpt2(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=16)
SWIGLU = ModelConfig.llama(
  vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16
)


def _model_grads(cfg, fn, tokens, params=None):
  """(params, grads of the next-token loss) with every Dense computed by ``fn``."""
  model = TransformerLM(cfg, make_precision("fp32"))
  if params is None:
    params = nn.unbox(compiled.init(model, jax.random.key(0), tokens)["params"])

  def loss(p):
    with _patched_dense(fn):
      logits = model.apply({"params": p}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return params, jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize(
  "cfg",
  [
    dataclasses.replace(TINY, scan_layers=True, remat="full"),
    dataclasses.replace(TINY, scan_layers=True, remat="dots"),
    dataclasses.replace(TINY, remat="dots"),
    dataclasses.replace(SWIGLU, scan_layers=True, remat="full"),
  ],
  ids=["gpt2-scan-full", "gpt2-scan-dots", "gpt2-remat-dots", "llama-scan-full"],
)
@pytest.mark.slow
def test_model_grads_through_scan_and_remat_equal_autodiff(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 16)), jnp.int32)
  params, got = _model_grads(cfg, dense, tokens)
  _, want = _model_grads(cfg, plain_dense, tokens, params)
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  # fp32 through two blocks, the softmax and the loss: a few ulps of each gradient's
  # scale. atol covers leaves whose exact gradient is 0 (key biases: the softmax is
  # shift-invariant), where both sides hold rounding noise of ~1e-12.
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.multidevice
def test_dense_under_jit_with_named_shardings():
  """Batch split over "data", kernel columns over "tensor" (8 fake CPU devices)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  rng = np.random.default_rng(0)
  x, kernel, bias, ct = (
    jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 5, 16), (16, 24), (24,), (8, 5, 24))
  )
  shard = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  args = (shard(x, "data"), shard(kernel, None, "tensor"), shard(bias, "tensor"))
  ct_sharded = shard(ct, "data", None, "tensor")
  kw = dict(activation=ACTIVATIONS["gelu"])
  got = jax.jit(lambda ct, *a: _grads(dense, ct, *a, **kw))(ct_sharded, *args)
  want = _grads(plain_dense, ct, x, kernel, bias, **kw)
  # fp32 rounding only: the jitted program and the eager ops round the GELU differently
  # (measured 3e-6 at XLA's backend optimisation level 0, <1e-6 at the default level).
  for g, w in zip(got, want):
    assert _rel_err(g, w) < 1e-5
