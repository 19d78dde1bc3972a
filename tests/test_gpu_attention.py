"""cuDNN flash attention (``model.attention_impl=cudnn``) against llm_mp's XLA path
and a float64 NumPy reference.

Cases (:func:`make_case`): causal, bidirectional with key padding, packed
segments (causal within each document), grouped-query heads, cached decoding
(the call the KV cache makes: new queries against the whole cache and its
mask), and large close logits (the softmax must see fp32 logits). Each runs in
bf16 and fp16. The tests marked ``gpu`` need a GPU and are skipped elsewhere
(tests/conftest.py defaults ``JAX_PLATFORMS`` to cpu: run with ``JAX_PLATFORMS=``);
the others run the XLA path against the reference on any backend, in fp32,
bf16 and fp16, which checks the reference and the tolerances themselves.

Tolerances (:func:`tolerance`) come from the formats, with ``u`` the unit
roundoff (2^-8 bf16, 2^-11 fp16, 2^-24 fp32). The reference gets the same
rounded ``q, k, v``, so input rounding is not an error. Logits accumulate in
fp32 (error ``<= H * 2^-24 * scale * sum|q||k|``, added to the bound). The
probabilities are rounded to the input format once before ``P @ V`` (relative
``u`` each) and the output once more (``u``): since the weights sum to 1,
``|out - ref| <= 2u * max|v|`` whatever the number of keys ``S``. A path that
accumulated ``P @ V`` in the half format would add ``~u * sqrt(S)`` instead,
and fail. We allow 4u (twice the bound: flash attention's running-max rescale
and its approximate exp add fp32-level terms). Two paths are compared with the
sum of their tolerances. For the large-logits case ``v`` is the identity, so
the output is the probabilities themselves and the bound is relative:
``|p - p_ref| <= 4u * p_ref``; logits rounded to bf16 (or fp16) before the
softmax would be off by 0.5 (0.06) around 160 and fail by 30x.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp.model_config import ModelConfig
from llm_mp.models.attention import Attention, attend, dot_product_attention, segment_mask
from llm_mp.precision import make_precision

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(
  not ON_GPU,
  reason="cuDNN flash attention needs a GPU (jax.default_backend() != 'gpu'; "
  "tests/conftest.py sets JAX_PLATFORMS=cpu unless it is set, e.g. to empty)",
)
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
ULPS = 4
CASES = ("causal", "padding", "segments", "gqa", "decode", "large_logits")
HALF = ("bfloat16", "float16")


def reference_attention(q, k, v, mask=None, causal=False) -> np.ndarray:
  """float64 softmax attention in NumPy.

  ``q [B, T, N, H]``, ``k, v [B, S, K, H]`` (query head ``n`` reads KV head
  ``n // (N / K)``, as llm_mp's layout), ``mask`` bool broadcastable to
  ``[B, 1, T, S]``; ``causal`` hides keys at ``s > t``. Returns float64
  ``[B, T, N, H]``; rows that see no key are NaN.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)  # (B, S, N, H)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)  # (B, N, T, S)
  keep = np.ones((1, 1, t, s), bool) if mask is None else np.asarray(mask, bool)
  if causal:
    keep = keep & (np.arange(s)[None, :] <= np.arange(t)[:, None])
  logits = np.where(keep, logits, -np.inf)
  with np.errstate(invalid="ignore"):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def make_case(name: str, dtype: str, seed: int = 0) -> dict:
  """Inputs of one case: ``q, k, v`` as ``dtype`` arrays, ``mask``, ``causal``,
  ``rows`` (bool ``[B, T]``, the query rows compared: rows that see no key
  are left undefined by the kernels) and ``relative`` (the tolerance scales
  with each reference value rather than with ``max|v|``)."""
  rng = np.random.default_rng(seed)
  b, t, n, kh, h = 2, 128, 8, 8, 64
  s, mask, causal = t, None, False
  if name == "causal":
    causal = True
  elif name == "padding":  # an encoder batch: the second row has 37 padding keys
    lengths = np.array([t, t - 37])
    mask = jnp.asarray((np.arange(s)[None, :] < lengths[:, None])[:, None, None])  # (B, 1, 1, S)
  elif name == "segments":  # packed documents, id 0 = padding, causal inside each
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:100], seg[0, 100:] = 1, 2, 3
    seg[1, :90], seg[1, 90:120] = 1, 2
    mask, causal = segment_mask(jnp.asarray(seg), jnp.asarray(seg)), True
  elif name == "gqa":
    kh, causal = 2, True
  elif name == "decode":  # 4 new queries at cache index 61 of a 128-slot cache (GQA)
    kh, t, index = 2, 4, 61
    q_pos = index + np.arange(t)
    mask = jnp.asarray((np.arange(s)[None, :] <= q_pos[:, None])[None, None])  # (1, 1, T, S)
  elif name == "large_logits":  # logits 160 +- ~1: fp32 keeps their differences
    n = kh = 1
    s = t = h
    c = np.sqrt(160 * np.sqrt(h))
    q = np.concatenate([np.full((b, t, n, 1), c), rng.normal(size=(b, t, n, h - 1))], -1)
    k = np.concatenate([np.full((b, s, kh, 1), c), rng.normal(size=(b, s, kh, h - 1))], -1)
    v = np.broadcast_to(np.eye(s, h)[None, :, None], (b, s, kh, h))  # out = probabilities
    return dict(
      q=jnp.asarray(q, dtype),
      k=jnp.asarray(k, dtype),
      v=jnp.asarray(v, dtype),
      mask=None,
      causal=False,
      rows=np.ones((b, t), bool),
      relative=True,
    )
  else:
    raise ValueError(f"unknown case {name!r}; cases: {CASES}")
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  if name == "decode":  # slots after the new queries are still empty
    k, v = (x.at[:, index + t :].set(0) for x in (k, v))
  rows = np.ones((b, t), bool) if name != "segments" else seg > 0
  return dict(q=q, k=k, v=v, mask=mask, causal=causal, rows=rows, relative=False)


def tolerance(case: dict) -> float:
  """The bound of the module docstring for one path against float64: absolute,
  or relative to each reference value when ``case["relative"]``."""
  q, k, v = (np.abs(np.asarray(case[x], np.float64)) for x in "qkv")
  u = UNIT_ROUNDOFF[str(case["q"].dtype)]
  h = q.shape[-1]
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  # fp32 dot products of length H are off by <= H * 2^-24 * sum_h |q_h||k_h| (scaled);
  # a logit error d changes each probability by a factor within exp(+-2d).
  logit_err = h * 2.0**-24 * np.einsum("btnh,bsnh->bnts", q, k).max() / np.sqrt(h)
  return (ULPS * u + 2 * logit_err) * (1.0 if case["relative"] else v.max())


def check_close(out, ref: np.ndarray, case: dict, tol: float) -> None:
  """Asserts ``|out - ref| <= tol`` (times ``|ref|`` when ``case["relative"]``) on the
  compared rows, and that they are finite."""
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  rows = case["rows"]
  err = np.abs(out - ref)[rows]
  bound = tol * np.abs(ref)[rows] if case["relative"] else tol
  assert np.all(np.isfinite(out[rows])), "non-finite outputs"
  worst = np.max(err / bound)
  assert worst <= 1.0, f"error {worst:.2f}x the tolerance (max abs error {err.max():.3g})"


def run_path(case: dict, impl: str) -> jax.Array:
  """llm_mp's attention by ``model.attention_impl`` on a case (jitted, as in a model)."""
  f = jax.jit(lambda q, k, v, m: attend(q, k, v, impl, mask=m, causal=case["causal"]))
  return f(case["q"], case["k"], case["v"], case["mask"])


def reference_of(case: dict) -> np.ndarray:
  return reference_attention(case["q"], case["k"], case["v"], case["mask"], case["causal"])


@pytest.mark.parametrize("dtype", ("float32",) + HALF)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_xla_path_matches_float64_reference(name, dtype):
  case = make_case(name, dtype)
  check_close(run_path(case, "xla"), reference_of(case), case, tolerance(case))


@pytest.mark.parametrize("dtype", HALF)
def test_xla_softmax_runs_in_fp32(dtype):
  # attention.py: "logits accumulate and the softmax runs in fp32" for half inputs.
  case = make_case("gqa", dtype)
  jaxpr = jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, causal=True))(
    case["q"], case["k"], case["v"]
  )
  softmax_ops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("exp", "reduce_max")]
  assert softmax_ops
  assert {str(v.aval.dtype) for e in softmax_ops for v in e.outvars} == {"float32"}
  assert str(jaxpr.out_avals[0].dtype) == dtype


def test_tolerances_catch_half_precision_logits():
  # The large-logits case fails by far when the logits are rounded to bf16 before the
  # softmax: the bound above discriminates the fp32 claim, not just any error.
  case = make_case("large_logits", "bfloat16")
  q = case["q"].astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q, case["k"].astype(jnp.float32)) / 8.0
  probs = jax.nn.softmax(logits.astype(jnp.bfloat16).astype(jnp.float32), -1)
  out = jnp.einsum("bnts,bsnh->btnh", probs, case["v"].astype(jnp.float32))
  with pytest.raises(AssertionError, match="the tolerance"):
    check_close(out, reference_of(case), case, tolerance(case))


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", CASES)
def test_cudnn_matches_float64_reference_and_xla_path(name, dtype):
  case = make_case(name, dtype)
  out = run_path(case, "cudnn")
  assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
  tol = tolerance(case)
  check_close(out, reference_of(case), case, tol)
  check_close(out, np.asarray(run_path(case, "xla"), np.float64), case, 2 * tol)


def _attention(impl: str, decode: bool) -> Attention:
  """A GQA self-attention layer (8 query heads, 2 KV heads, H=64) under the bf16 policy."""
  config = ModelConfig.gpt2(
    vocab_size=64, d_model=512, n_layers=1, n_heads=8, n_kv_heads=2, max_len=64
  )
  config = dataclasses.replace(config, attention_impl=impl)
  return Attention(config, make_precision("bf16"), causal=True, decode=decode)


def decode_case(impl: str, prompt: int = 16, new: int = 8) -> tuple[dict, jax.Array]:
  """The layer with its KV cache (``attention_impl=impl``) on a ``prompt``-token
  chunk, then ``new`` single tokens.

  The ``query``/``key``/``value`` projections and the attention output (the input
  of ``out``) of every call are captured and joined along time: the cache must
  make the calls equal to causal attention over the whole sequence. Returns
  ``(case, out)``: a causal case of ``q [B, T, 8, 64]``, ``k, v [B, T, 2, 64]``
  (bf16, ``T = prompt + new``) for :func:`reference_attention`, and the
  attention output ``[B, T, 8, 64]``.
  """
  x = jax.random.normal(jax.random.key(1), (2, 64, 512))
  variables = nn.unbox(_attention("xla", True).init(jax.random.key(0), x))
  model = _attention(impl, True)

  def step(cache, xs):
    seen = {}

    def capture(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      name = context.module.name
      if context.method_name == "__call__" and name in ("query", "key", "value", "out"):
        seen[name] = args[0] if name == "out" else y  # the attention output enters `out`
      return y

    with nn.intercept_methods(capture):
      _, mutated = model.apply(
        {"params": variables["params"], "cache": cache}, xs, mutable=["cache"]
      )
    return mutated["cache"], seen

  step, cache, calls = jax.jit(step), variables["cache"], []
  for chunk in [x[:, :prompt]] + [x[:, i : i + 1] for i in range(prompt, prompt + new)]:
    cache, seen = step(cache, chunk)
    calls.append(seen)
  q, k, v, out = (
    jnp.concatenate([c[n] for c in calls], 1) for n in ("query", "key", "value", "out")
  )
  b, t = q.shape[:2]
  case = dict(q=q, k=k, v=v, mask=None, causal=True, rows=np.ones((b, t), bool), relative=False)
  return case, out


@pytest.mark.slow
def test_xla_cached_decoding_matches_float64_reference():
  case, out = decode_case("xla")
  assert case["q"].dtype == out.dtype == jnp.bfloat16
  check_close(out, reference_of(case), case, tolerance(case))


@gpu
def test_cudnn_cached_decoding_matches_float64_reference_and_xla():
  case, out = decode_case("cudnn")
  tol = tolerance(case)
  check_close(out, reference_of(case), case, tol)
  xla_case, xla_out = decode_case("xla")
  np.testing.assert_array_equal(np.asarray(case["v"]), np.asarray(xla_case["v"]))  # same inputs
  check_close(out, np.asarray(jnp.asarray(xla_out, jnp.float32), np.float64), case, 2 * tol)
