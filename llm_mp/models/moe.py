"""Mixture-of-experts feed-forward layer (top-k routing, dense dispatch).

Every expert runs on every token and the outputs are mixed by the (sparse,
top-k) gates: exact and simple, at ``n_experts`` times an MLP's FLOPs, which
suits studying precision on small models; a capacity-based dispatch is the
step up for large ones. The router runs in fp32 under every policy (the
``*router*`` override): top-k decisions flip on bf16 rounding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.layers import ACTIVATIONS, Dense, normal_init
from llm_mp.precision import Precision, module_policy


class MoE(nn.Module):
  """``[B, T, d]`` -> ``[B, T, d]``: two-layer experts (the config's activation, ungated).

  The Switch-Transformer auxiliary loss ``E * sum_e f_e * p_e`` (``f_e``:
  fraction of tokens routed to expert e, ``p_e``: mean router probability) is
  stored with ``self.sow("intermediates", "aux_loss", ...)``.
  """

  config: ModelConfig
  precision: Precision

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    c = self.config
    e, f = c.n_experts, c.ff_dim
    router_logits = Dense(e, ("embed", None), self.precision, use_bias=False,
                          init_std=c.init_std, name="router")(x)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # (B, T, E) fp32
    top_p, top_i = jax.lax.top_k(probs, c.expert_top_k)  # (B, T, k)
    top_p = top_p / top_p.sum(-1, keepdims=True)
    gates = jnp.sum(jax.nn.one_hot(top_i, e, dtype=jnp.float32) * top_p[..., None], axis=-2)
    routed = jnp.mean(jax.nn.one_hot(top_i[..., 0], e, dtype=jnp.float32), axis=(0, 1))
    self.sow("intermediates", "aux_loss", e * jnp.sum(routed * probs.mean(axis=(0, 1))))

    policy = module_policy(self)
    w_in = self.param("w_in", normal_init(c.init_std, ("expert", "embed", "mlp")), (e, c.d_model, f),
                      policy.param_dtype)
    w_out = self.param("w_out", normal_init(c.init_std / (2 * c.n_layers) ** 0.5,
                                        ("expert", "mlp", "embed")), (e, f, c.d_model),
                       policy.param_dtype)
    x, w_in, w_out = policy.cast_to_compute((x, w_in, w_out))
    h = ACTIVATIONS[c.mlp](jnp.einsum("btd,edf->btef", x, w_in))  # (B, T, E, F)
    out = jnp.einsum("btef,efd,bte->btd", h, w_out, gates.astype(h.dtype))
    out = policy.cast_to_output(out)
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)
