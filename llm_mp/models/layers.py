"""Building blocks: dense, norms, embeddings, positions, MLP.

Every module takes ``precision`` (a :class:`llm_mp.precision.Precision`) and
resolves its own ``jmp.Policy`` from its path, so a per-module override such as
``*norm*=f32`` reaches exactly the modules it names. Parameters carry logical
axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``) that
``llm_mp.sharding`` maps to mesh axes; the model knows no mesh.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_mp.config import ModelConfig
from llm_mp.precision import Precision, module_policy


def normal_init(std: float, axes: Sequence[str | None]):
  """N(0, std) initializer whose parameter carries logical axis names ``axes``."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


class Dense(nn.Module):
  """``y = x @ W (+ b)`` contracting the last ``n_in`` axes of ``x``.

  Attributes:
    features: output feature shape, e.g. ``768`` or ``(n_heads, head_dim)``.
    axes: logical names of the kernel's axes (input axes then output axes).
    n_in: how many trailing axes of ``x`` are contracted.

  Input ``[..., *in_shape]`` in any float dtype; output ``[..., *features]`` in
  the module policy's output dtype; the matmul runs in its compute dtype.
  """

  features: int | Sequence[int]
  axes: Sequence[str | None]
  precision: Precision
  use_bias: bool = True
  n_in: int = 1
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    policy = module_policy(self)
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.n_in:]
    kernel = self.param("kernel", normal_init(self.init_std, self.axes), in_shape + features,
                        policy.param_dtype)
    x, kernel = policy.cast_to_compute((x, kernel))
    contract = tuple(range(x.ndim - self.n_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.n_in))), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                               tuple(self.axes[self.n_in:])),
          features, policy.param_dtype)
      y = y + policy.cast_to_compute(bias)
    return policy.cast_to_output(y)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis.

  Statistics are computed in the policy's compute dtype (fp32 under the
  default ``*norm*`` override); the result is returned in its output dtype.
  """

  kind: str
  precision: Precision
  eps: float = 1e-5
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    policy = module_policy(self)
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), policy.param_dtype)
    x, scale = policy.cast_to_compute((x, scale))
    if self.kind == "layernorm":
      mean = jnp.mean(x, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale
      if self.use_bias:
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (d,), policy.param_dtype)
        y = y + policy.cast_to_compute(bias)
    else:  # rmsnorm
      ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
      y = x * jax.lax.rsqrt(ms + self.eps) * scale
    return policy.cast_to_output(y)


class Embed(nn.Module):
  """Token embedding ``[vocab, d]``; ``attend`` gives tied-head logits.

  ``__call__``: int ``[B, T]`` -> ``[B, T, d]`` in the output dtype.
  """

  vocab_size: int
  d_model: int
  precision: Precision
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param("embedding", normal_init(self.init_std, ("vocab", "embed")),
                                (self.vocab_size, self.d_model),
                                module_policy(self).param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    policy = module_policy(self)
    return policy.cast_to_output(jnp.take(policy.cast_to_compute(self.embedding), tokens, axis=0))

  def attend(self, x: jax.Array, policy) -> jax.Array:
    """``[B, T, d]`` -> logits ``[B, T, vocab]`` under ``policy`` (the head's)."""
    x, emb = policy.cast_to_compute((x, self.embedding))
    return policy.cast_to_output(jnp.einsum("btd,vd->btv", x, emb))


class LearnedPositions(nn.Module):
  """GPT-2 position table ``[max_len, d]``; int ``[B, T]`` -> ``[B, T, d]``."""

  max_len: int
  d_model: int
  precision: Precision

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    policy = module_policy(self)
    table = self.param("pos_embedding", normal_init(0.01, (None, "embed")),
                       (self.max_len, self.d_model), policy.param_dtype)
    return policy.cast_to_output(jnp.take(policy.cast_to_compute(table), positions, axis=0))


def sinusoidal_positions(positions: jax.Array, d_model: int) -> jax.Array:
  """Vaswani et al. sin/cos encoding: int ``[B, T]`` -> float32 ``[B, T, d]``."""
  half = d_model // 2
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half).astype(np.float32)
  angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, d/2)
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if d_model % 2:
    enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
  return enc


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) of ``x [B, T, N, H]`` at int ``positions [B, T]``.

  Angles and rotation are computed in fp32 (at least); the result has ``x``'s dtype.
  """
  h = x.shape[-1]
  freqs = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))  # (H/2,)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions[..., None].astype(acc) * freqs.astype(acc)  # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]  # (B, T, 1, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nn.Module):
  """Position-wise feed-forward: ``[B, T, d]`` -> ``[B, T, d]``.

  ``gelu``/``relu``: ``down(act(up(x)))``; ``swiglu``/``geglu``:
  ``down(act(gate(x)) * up(x))``.
  """

  config: ModelConfig
  precision: Precision

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    c = self.config
    dense = lambda feats, axes, name: Dense(feats, axes, self.precision, use_bias=c.use_bias,
                                            init_std=c.init_std, name=name)
    act = ACTIVATIONS[c.mlp]
    if c.mlp in ("swiglu", "geglu"):
      h = act(dense(c.ff_dim, ("embed", "mlp"), "gate")(x)) * dense(c.ff_dim, ("embed", "mlp"),
                                                                    "up")(x)
    else:
      h = act(dense(c.ff_dim, ("embed", "mlp"), "up")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    # GPT-2 scales the init of residual-branch outputs by 1/sqrt(2 * n_layers).
    out = Dense(c.d_model, ("mlp", "embed"), self.precision, use_bias=c.use_bias,
                init_std=c.init_std / np.sqrt(2 * c.n_layers), name="down")(h)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)
