"""Building blocks: Dense, norms, embeddings, positions, MLP.

Every module takes ``precision`` (a :class:`llm_mp.precision.Precision`) and
resolves its own ``jmp.Policy`` from its path, so a per-module override such as
``*norm*=f32`` reaches exactly the modules it names. Parameters carry logical
axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``) that
``llm_mp.sharding`` maps to mesh axes; the model knows no mesh.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_mp.formats import Weight, matmul
from llm_mp.model_config import GATED_MLPS, ModelConfig
from llm_mp.precision import Precision, module_policy


def normal_init(std: float, axes: Sequence[str | None]):
  """N(0, std) initializer whose parameter carries logical axis names ``axes``."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


class Dense(nn.Module):
  """``y = activation(x @ W (+ b))`` contracting the last ``n_in`` axes of ``x``.

  Attributes:
    features: output feature shape, e.g. ``768`` or ``(n_heads, head_dim)``.
    axes: logical names of the kernel's axes (input axes then output axes).
    n_in: how many trailing axes of ``x`` are contracted.
    activation: elementwise function of the output (in the output dtype),
      fused into the layer's gradient; None for a linear layer.

  Input ``[..., *in_shape]`` in any float dtype; output ``[..., *features]`` in
  the module policy's output dtype; the matmul runs in its compute dtype, in the
  matmul format the precision policy names for the module (``llm_mp.formats``).
  """

  features: int | Sequence[int]
  axes: Sequence[str | None]
  precision: Precision
  use_bias: bool = True
  n_in: int = 1
  init_std: float = 0.02
  activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    policy = module_policy(self)
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    weight = Weight("kernel", x.shape[-self.n_in :], features, tuple(self.axes), self.init_std)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.axes[self.n_in :]))
    make_bias = lambda: policy.cast_to_compute(
      self.param("bias", bias_init, features, policy.param_dtype)
    )
    return matmul(
      self,
      policy.cast_to_compute(x),
      weight,
      bias=make_bias if self.use_bias else None,
      activation=self.activation,
      out_dtype=policy.output_dtype,
    )


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
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (d,),
      policy.param_dtype,
    )
    bias = None
    if self.kind == "layernorm" and self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        (d,),
        policy.param_dtype,
      )
    x, scale, bias = policy.cast_to_compute((x, scale, bias))
    # Rematerialised: the backward pass recomputes the statistics from x (one
    # reduction over d) rather than keeping x - mean and the normalised x alive;
    # fewer passes over memory, and the same ops as autodiff.
    y = jax.checkpoint(normalize, static_argnums=(3, 4))(x, scale, bias, self.kind, self.eps)
    return policy.cast_to_output(y)


def normalize(
  x: jax.Array, scale: jax.Array, bias: jax.Array | None, kind: str, eps: float
) -> jax.Array:
  """LayerNorm (``kind="layernorm"``) or RMSNorm of ``x [..., d]`` over its last axis.

  ``scale``, ``bias`` (None: no bias; RMSNorm takes none): ``[d]``. Everything
  runs in ``x``'s dtype; the result has ``x``'s shape and dtype.
  """
  if kind == "layernorm":
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale
    return y if bias is None else y + bias
  ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)  # rmsnorm
  return x * jax.lax.rsqrt(ms + eps) * scale


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Logits ``[..., V_padded]`` with columns ``>= vocab_size`` set to a large negative.

  Those columns come from padding the vocabulary (``model.vocab_multiple``);
  masked, their softmax probability is exactly 0, so the loss and samples are
  those of the unpadded model. The value is finite and far from the dtype's
  limit (fp16: -32752), so ``logits - max`` cannot overflow to -inf and make
  ``0 * -inf`` NaNs. Same dtype and shape out; no-op when nothing is padded.
  """
  if logits.shape[-1] == vocab_size:
    return logits
  neg = max(-1e9, float(jnp.finfo(logits.dtype).min) / 2)
  real = jnp.arange(logits.shape[-1]) < vocab_size
  return jnp.where(real, logits, jnp.asarray(neg, logits.dtype))


class Embed(nn.Module):
  """Token embedding ``[vocab, d]``; ``attend`` gives tied-head logits.

  ``__call__``: int ``[B, T]`` -> ``[B, T, d]`` in the output dtype.
  """

  vocab_size: int
  d_model: int
  precision: Precision
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
      "embedding",
      normal_init(self.init_std, ("vocab", "embed")),
      (self.vocab_size, self.d_model),
      module_policy(self).param_dtype,
    )

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
    table = self.param(
      "pos_embedding",
      normal_init(0.01, (None, "embed")),
      (self.max_len, self.d_model),
      policy.param_dtype,
    )
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


def rope_frequencies(
  head_dim: int,
  theta: float,
  scaling: str = "none",
  factor: float = 1.0,
  low_freq_factor: float = 1.0,
  high_freq_factor: float = 4.0,
  original_max_len: int = 8192,
) -> np.ndarray:
  """float32 ``[head_dim / 2]`` rotation frequencies ``theta^(-2i/head_dim)``, scaled.

  ``scaling`` as HF's ``rope_scaling``: "none"; "linear" (all divided by
  ``factor``); "llama3" (wavelengths longer than ``original_max_len /
  low_freq_factor`` divided by ``factor``, those shorter than
  ``original_max_len / high_freq_factor`` kept, a linear blend between).
  """
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if scaling == "linear":
    freqs = freqs / factor
  elif scaling == "llama3":
    wavelen = 2 * math.pi / freqs
    low_wavelen = original_max_len / low_freq_factor  # longer: fully scaled
    high_wavelen = original_max_len / high_freq_factor  # shorter: unchanged
    scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    freqs = np.where(medium, blended, scaled)
  return freqs.astype(np.float32)


def config_rope_frequencies(c: ModelConfig) -> np.ndarray:
  """:func:`rope_frequencies` of a model config's head dim, theta and scaling."""
  return rope_frequencies(
    c.head_dim,
    c.rope_theta,
    c.rope_scaling,
    c.rope_factor,
    c.rope_low_freq_factor,
    c.rope_high_freq_factor,
    c.rope_original_max_len,
  )


def apply_rope(
  x: jax.Array, positions: jax.Array, theta: float, freqs: np.ndarray | None = None
) -> jax.Array:
  """Rotary embedding (rotate-half form) of ``x [B, T, N, H]`` at int ``positions [B, T]``.

  ``freqs`` (float ``[H/2]``, e.g. from :func:`rope_frequencies` with a
  scaling) replace the plain ``theta^(-2i/H)``. Angles and rotation are
  computed in fp32 (at least); the result has ``x``'s dtype.
  """
  h = x.shape[-1]
  if freqs is None:
    freqs = rope_frequencies(h, theta)  # (H/2,)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions[..., None].astype(acc) * jnp.asarray(freqs, acc)  # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]  # (B, T, 1, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
  "swiglu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nn.Module):
  """Position-wise feed-forward: ``[B, T, d]`` -> ``[B, T, d]``.

  ``gelu``/``gelu_exact``/``relu``: ``down(act(up(x)))``; ``swiglu``/``geglu``:
  ``down(act(gate(x)) * up(x))``.
  """

  config: ModelConfig
  precision: Precision

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    c = self.config
    # The activation runs inside the layer that feeds it, so its derivative is
    # fused into that layer's gradient.
    inner = lambda name, act=None: Dense(
      c.ff_dim,
      ("embed", "mlp"),
      self.precision,
      use_bias=c.bias("mlp"),
      init_std=c.init_std,
      activation=act,
      name=name,
    )
    act = ACTIVATIONS[c.mlp]
    if c.mlp in GATED_MLPS:
      h = inner("gate", act)(x) * inner("up")(x)
    else:
      h = inner("up", act)(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    # GPT-2 scales the init of residual-branch outputs by 1/sqrt(2 * n_layers).
    out = Dense(
      c.d_model,
      ("mlp", "embed"),
      self.precision,
      use_bias=c.bias("mlp"),
      init_std=c.init_std / np.sqrt(2 * c.n_layers),
      name="down",
    )(h)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)
