"""Multi-head attention (self or cross, GQA, RoPE, KV cache), masks and T5's relative bias.

``attention_impl="xla"`` is :func:`dot_product_attention` below (logits and
softmax in fp32 whatever the input dtype, on every backend);
``attention_impl="cudnn"`` is ``jax.nn.dot_product_attention``'s GPU
flash-attention kernel (causal masking without materialising ``T x T``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.layers import Dense, apply_rope, config_rope_frequencies, normal_init
from llm_mp.precision import Precision, module_policy


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
  """bool ``[B, 1, T, S]``: query and key belong to the same document (id > 0)."""
  same = q_segments[:, :, None] == kv_segments[:, None, :]
  return (same & (kv_segments[:, None, :] > 0))[:, None]


def relative_position_bucket(
  relative: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucket of each ``relative = key_position - query_position`` (int array, any shape).

  Bidirectional: half the buckets for keys at or before the query, half for
  keys after it. In each half (the whole table when unidirectional, where keys
  after the query all fall in bucket 0) the first ``n/2`` distances get a
  bucket each and longer distances share log-spaced buckets up to
  ``max_distance``; farther ones go to the last bucket. Returns int32, same shape.
  """
  n = -relative.astype(jnp.int32)  # distance back from the query
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  # fp32 as in T5 (eps keeps log(0) out of the branch that `where` discards).
  scaled = (
    jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
    / math.log(max_distance / max_exact)
    * (num_buckets - max_exact)
  )
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return ret + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
  """T5's learned relative position bias: one scalar per (bucket, head).

  ``__call__(q_positions int[B, T], k_positions int[B, S])`` -> fp32
  ``[B, N, T, S]``, added to the self-attention logits (fp32 under every
  policy: it sits beside logits kept in fp32). The table ``embedding``
  ``[buckets, n_heads]`` is a parameter in the module policy's param dtype.
  """

  config: ModelConfig
  precision: Precision
  bidirectional: bool = True

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    c = self.config
    table = self.param(
      "embedding",
      normal_init(c.init_std, (None, "heads")),
      (c.relative_buckets, c.n_heads),
      module_policy(self).param_dtype,
    )
    buckets = relative_position_bucket(
      k_positions[:, None, :] - q_positions[:, :, None],
      self.bidirectional,
      c.relative_buckets,
      c.relative_max_distance,
    )  # (B, T, S)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (B, T, S, N)
    return bias.transpose(0, 3, 1, 2)


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  causal: bool = False,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention with grouped-query heads.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``K`` dividing ``N``.
    mask: bool, broadcastable to ``[B, 1, T, S]``; True = may attend.
    causal: also hide keys at positions after the query's (``s > t``).
    bias: float ``[1 | B, N, T, S]`` added to the scaled logits in fp32 (a
      relative position bias), or None.

  Returns:
    ``[B, T, N, H]`` in ``v``'s dtype. Logits accumulate and the softmax runs
    in fp32 (kept in fp32 under every policy: exp overflows fp16 at 11.1).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  # The G query heads sharing a KV head are stacked as G*T query rows, so both
  # matmuls (and their gradients) are 4-D batched matmuls over (B, K): XLA:CPU
  # runs these about twice as fast as 5-D einsums with a G axis (size 1 in MHA).
  q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)  # (B, K, G*T, H)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
  acc = jnp.promote_types(q.dtype, jnp.float32)  # fp32, or fp64 for references
  logits = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=acc)
  logits = logits * (h**-0.5)  # (B, K, G*T, S)
  if bias is not None:  # head n = k * G + g, as the query reshape above
    bias = bias.astype(acc).reshape(bias.shape[0], kh, g * t, s)
    logits = logits + bias
  if causal:
    tril = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]  # (T, S)
    mask = tril[None, None] if mask is None else mask & tril
  if mask is not None:
    logits = logits.reshape(b, kh, g, t, s)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(acc).min).reshape(b, kh, g * t, s)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v)  # (B, K, G*T, H)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  impl: str,
  mask: jax.Array | None = None,
  causal: bool = False,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Attention by ``model.attention_impl`` (resolved: "xla" or "cudnn"), shapes and
  arguments as :func:`dot_product_attention`; "cudnn" needs a GPU and bf16/fp16 inputs."""
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=causal, implementation="cudnn"
    )
  return dot_product_attention(q, k, v, mask=mask, causal=causal, bias=bias)


class Attention(nn.Module):
  """Attention over ``[B, T, d]`` queries and ``[B, S, d]`` keys/values.

  Attributes:
    causal: each query sees only keys at positions <= its own.
    decode: use and update a fixed-size KV cache (``cache`` collection).
      Self-attention: ``cached_key``/``cached_value`` of
      ``[B, max_len, kv_heads, head_dim]`` and an int32 ``index``; the first
      ``init`` with ``decode=True`` on ``[B, max_len]`` tokens creates it.
      Cross-attention (``cross=True``): ``context_key``/``context_value`` of
      ``[B, S, kv_heads, head_dim]``, the projections of the context, written
      by a call that passes ``context`` and read by the calls that pass
      ``context=None`` (the encoder output is projected once per generation).
    cross: cross-attention (keys/values from ``context``); only needed to
      tell a cached cross-attention from self-attention when ``context`` is None.
  """

  config: ModelConfig
  precision: Precision
  causal: bool = True
  decode: bool = False
  cross: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    deterministic: bool = True,
    bias: jax.Array | None = None,
  ) -> jax.Array:
    """``x [B, T, d]``, ``context [B, S, d]`` (None = self-attention, or a
    cached cross-attention), ``mask`` bool broadcastable to ``[B, N, T, S]``,
    int ``positions [B, T]`` (for RoPE), ``bias`` float ``[1 | B, N, T, S]``
    added to the logits (decoding: ``S`` = the cache length) -> ``[B, T, d]``."""
    c = self.config
    cross = self.cross or context is not None
    dense = lambda feats, axes, name: Dense(
      feats, axes, self.precision, use_bias=c.bias("qkv"), init_std=c.init_std, name=name
    )
    q = dense((c.n_heads, c.head_dim), ("embed", "heads", "kv"), "query")(x)  # (B, T, N, H)
    if cross and self.decode:
      k, v = self._context_cache(context, dense)  # (B, S, K, H)
    else:
      kv_in = x if context is None else context
      k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "key")(kv_in)
      v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "value")(kv_in)
    if c.position == "rope" and not cross:
      freqs = config_rope_frequencies(c)  # (H/2,)
      q = apply_rope(q, positions, c.rope_theta, freqs)
      k = apply_rope(k, positions, c.rope_theta, freqs)
    causal = self.causal
    if self.decode and not cross:
      k, v, mask = self._update_cache(k, v)
      causal = False  # the cache mask already hides future and empty slots
      if bias is not None:  # at init the keys are the input alone, not the whole cache
        bias = bias[..., : k.shape[1]]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    out = attend(q, k, v, c.attention_impl, mask=mask, causal=causal, bias=bias)  # (B, T, N, H)
    out = Dense(
      c.d_model,
      ("heads", "kv", "embed"),
      self.precision,
      use_bias=c.bias("attn_out"),
      n_in=2,
      init_std=c.init_std / (2 * c.n_layers) ** 0.5,
      name="out",
    )(out)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)

  def _context_cache(self, context: jax.Array | None, dense):
    """Cross-attention keys/values ``[B, S, K, H]``: projected from ``context``
    and stored when it is given, read back from the cache when it is None."""
    c = self.config
    if context is None:
      if not self.has_variable("cache", "context_key"):
        raise ValueError(
          "cached cross-attention called with context=None before a call "
          "with the context filled its cache"
        )
      return (
        self.get_variable("cache", "context_key"),
        self.get_variable("cache", "context_value"),
      )
    k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "key")(context)
    v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "value")(context)
    self.put_variable("cache", "context_key", k)
    self.put_variable("cache", "context_value", v)
    return k, v

  def _update_cache(self, k: jax.Array, v: jax.Array):
    """Writes ``k, v [B, L, K, H]`` at the cache index; returns the whole cache
    and the mask ``[1, 1, L, max_len]`` of slots each new query may see."""
    ready = self.has_variable("cache", "cached_key")
    shape = (k.shape[0], self.config.max_len) + k.shape[2:]
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
    if not ready:  # init: shapes only, attend causally over the input itself
      q_pos = jnp.arange(k.shape[1])
      return k, v, (jnp.arange(k.shape[1])[None, :] <= q_pos[:, None])[None, None]
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
    index.value = i + k.shape[1]
    q_pos = i + jnp.arange(k.shape[1])  # (L,)
    mask = jnp.arange(shape[1])[None, :] <= q_pos[:, None]  # (L, max_len)
    return cached_k.value, cached_v.value, mask[None, None]
