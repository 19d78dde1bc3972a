"""Multi-head attention (self or cross, GQA, RoPE, KV cache) and masks.

``attention_impl="xla"`` is :func:`dot_product_attention` below (logits and
softmax in fp32 whatever the input dtype, on every backend);
``attention_impl="cudnn"`` is ``jax.nn.dot_product_attention``'s GPU
flash-attention kernel (causal masking without materialising ``T x T``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.layers import Dense, apply_rope, config_rope_frequencies
from llm_mp.precision import Precision


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
  """bool ``[B, 1, T, S]``: query and key belong to the same document (id > 0)."""
  same = q_segments[:, :, None] == kv_segments[:, None, :]
  return (same & (kv_segments[:, None, :] > 0))[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
  """Softmax attention with grouped-query heads.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``K`` dividing ``N``.
    mask: bool, broadcastable to ``[B, 1, T, S]``; True = may attend.
    causal: also hide keys at positions after the query's (``s > t``).

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
  logits = logits * (h ** -0.5)  # (B, K, G*T, S)
  if causal:
    tril = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]  # (T, S)
    mask = tril[None, None] if mask is None else mask & tril
  if mask is not None:
    logits = logits.reshape(b, kh, g, t, s)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(acc).min).reshape(b, kh, g * t, s)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v)  # (B, K, G*T, H)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nn.Module):
  """Attention over ``[B, T, d]`` queries and ``[B, S, d]`` keys/values.

  Attributes:
    causal: each query sees only keys at positions <= its own.
    decode: use and update a fixed-size KV cache (``cache`` collection:
      ``cached_key``/``cached_value`` of ``[B, max_len, kv_heads, head_dim]``
      and an int32 ``index``; ``key``/``value`` name the projections); the
      first ``init`` with ``decode=True`` on ``[B, max_len]`` tokens creates it.
  """

  config: ModelConfig
  precision: Precision
  causal: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None, positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """``x [B, T, d]``, ``context [B, S, d]`` (None = self-attention),
    ``mask`` bool broadcastable to ``[B, N, T, S]``, int ``positions [B, T]``
    (for RoPE) -> ``[B, T, d]``."""
    c = self.config
    kv_in = x if context is None else context
    dense = lambda feats, axes, name: Dense(feats, axes, self.precision, use_bias=c.bias("qkv"),
                                            init_std=c.init_std, name=name)
    q = dense((c.n_heads, c.head_dim), ("embed", "heads", "kv"), "query")(x)  # (B, T, N, H)
    k = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "key")(kv_in)  # (B, S, K, H)
    v = dense((c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "value")(kv_in)
    if c.position == "rope" and context is None:
      freqs = config_rope_frequencies(c)  # (H/2,)
      q = apply_rope(q, positions, c.rope_theta, freqs)
      k = apply_rope(k, positions, c.rope_theta, freqs)
    causal = self.causal
    if self.decode and context is None:
      k, v, mask = self._update_cache(k, v)
      causal = False  # the cache mask already hides future and empty slots
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if c.attention_impl == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                         implementation="cudnn")
    else:
      out = dot_product_attention(q, k, v, mask=mask, causal=causal)  # (B, T, N, H)
    out = Dense(c.d_model, ("heads", "kv", "embed"), self.precision, use_bias=c.bias("attn_out"),
                n_in=2, init_std=c.init_std / (2 * c.n_layers) ** 0.5, name="out")(out)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)

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
