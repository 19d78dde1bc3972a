"""Mixture-of-experts feed-forward layer: top-1/top-2 routing with capacity-based dispatch.

GShard-style: a router (fp32 under every policy, by the ``*router*``
override, since top-k decisions flip on bf16 rounding) scores the ``N = B*T``
tokens of the call; each token goes to its ``top_k`` experts (1: Switch, 2:
GShard), each expert takes at most ``C = ceil(capacity_factor * top_k * N /
E)`` token-choices, and the rest are dropped: their MoE output for that
choice is 0 and the residual stream carries them. First choices (in token
order) fill the slots before any second choice. Dispatch and combine are
one-hot ``[N, E, C]`` tensors applied with einsums, and the experts run as
batched ``[E, C, d] x [E, d, f]`` matmuls, so the FLOPs are ``capacity_factor
* top_k`` MLPs' worth whatever ``E`` is (the one-hot einsums add ``O(N * E * C *
d)``, fine for the small ``N`` studied here; local groups are the step up).

Because capacity is shared by the whole call, a token's output may depend on
other tokens of the batch (later ones included) once an expert overflows;
with ``capacity_factor >= E / top_k`` nothing is ever dropped and the layer
is exactly causal and per-token.

Recorded with ``self.sow`` (only when the caller makes the collection mutable):
  * ``"losses"``: ``moe_aux_loss`` and ``moe_z_loss``, fp32 scalars already
    multiplied by ``config.moe_aux_weight`` / ``config.moe_z_weight``; the
    train step adds every leaf of this collection to the task loss.
  * ``"metrics"`` (unweighted): ``moe_aux_loss``, ``moe_z_loss``,
    ``moe_dropped_fraction`` and ``moe_expert_load`` (fp32 ``[E]``).
  * ``"intermediates"``: ``router_logits`` and ``router_probs`` (``[B, T, E]``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.formats import Weight, matmul
from llm_mp.model_config import GATED_MLPS, ModelConfig
from llm_mp.models.layers import ACTIVATIONS, Dense
from llm_mp.precision import Precision, module_policy


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert: ``ceil(capacity_factor * top_k * n_tokens / n_experts)``.

  Clipped to ``[1, n_tokens]``: an expert can receive at most one choice per
  token (a token's top-k experts are distinct), so more slots are never used.
  """
  capacity = math.ceil(capacity_factor * top_k * n_tokens / n_experts)
  return max(1, min(capacity, n_tokens))


def route(probs: jax.Array, mask: jax.Array, top_k: int, capacity: int):
  """Top-k capacity routing of ``N`` tokens to ``E`` experts (GShard / Switch).

  Args:
    probs: ``[N, E]`` router probabilities (fp32 or wider).
    mask: bool ``[N]``, True for real tokens; the others are never routed.
    top_k: experts per token. With ``top_k > 1`` the chosen probabilities are
      renormalised to sum to 1 (GShard); with 1 the gate is the probability
      itself (Switch), so the task loss still trains the router.
    capacity: slots per expert, ``C``.

  Returns:
    ``(dispatch, combine, chosen, kept)``: ``dispatch`` bool ``[N, E, C]``
    (token n sits in slot c of expert e), ``combine`` ``[N, E, C]`` in
    ``probs``' dtype (the gate at that slot), ``chosen`` ``[k, N, E]`` one-hot
    choices of the real tokens before the capacity cut, ``kept`` ``[k, N, E]``
    the same after it (both in ``probs``' dtype).
  """
  n, e = probs.shape
  dtype = probs.dtype
  top_p, top_i = jax.lax.top_k(probs, top_k)  # (N, k)
  if top_k > 1:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  real = mask.astype(dtype)[:, None]  # (N, 1)
  dispatch = jnp.zeros((n, e, capacity), bool)
  combine = jnp.zeros((n, e, capacity), dtype)
  filled = jnp.zeros((e,), dtype)  # slots taken by earlier (higher-priority) choices
  chosen, kept = [], []
  for j in range(top_k):  # choice j of every token before choice j+1 of any
    onehot = jax.nn.one_hot(top_i[:, j], e, dtype=dtype) * real  # (N, E)
    position = (jnp.cumsum(onehot, axis=0) - 1.0 + filled) * onehot  # slot index, 0 elsewhere
    keep = onehot * (position < capacity)
    filled = filled + jnp.sum(keep, axis=0)
    # (N, E, C): slot one-hot of the kept choice; dropped choices have no slot.
    slot = keep[:, :, None] * jax.nn.one_hot(position.astype(jnp.int32), capacity, dtype=dtype)
    dispatch = dispatch | (slot > 0)
    combine = combine + slot * top_p[:, j, None, None]
    chosen.append(onehot)
    kept.append(keep)
  return dispatch, combine, jnp.stack(chosen), jnp.stack(kept)


class MoE(nn.Module):
  """``[B, T, d]`` -> ``[B, T, d]``: ``config.n_experts`` two-layer experts with capacity routing.

  Experts use the config's activation (``swiglu``/``geglu``: gated, with an
  extra ``w_gate``), no biases; their weights carry the logical axis
  ``"expert"`` first, so a mesh can shard experts. ``mask`` (bool ``[B, T]``,
  None = all real) marks real tokens: padding is never routed, never takes a
  slot, gets output 0 and does not count in the losses or metrics.
  """

  config: ModelConfig
  precision: Precision

  @nn.compact
  def __call__(
    self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
  ) -> jax.Array:
    c = self.config
    e, f, k = c.n_experts, c.ff_dim, c.expert_top_k
    b, t, d = x.shape
    n = b * t
    capacity = expert_capacity(n, e, k, c.expert_capacity_factor)
    real = jnp.ones((n,), bool) if mask is None else mask.reshape(n).astype(bool)

    logits = Dense(
      e, ("embed", None), self.precision, use_bias=False, init_std=c.init_std, name="router"
    )(x)
    # At least fp32 whatever the policy says (float64 stays float64 in reference tests).
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)).reshape(n, e)
    probs = jax.nn.softmax(logits, axis=-1)  # (N, E)
    self.sow("intermediates", "router_logits", logits.reshape(b, t, e))
    self.sow("intermediates", "router_probs", probs.reshape(b, t, e))
    dispatch, combine, chosen, kept = route(probs, real, k, capacity)

    # Statistics over real tokens only.
    acc = probs.dtype
    n_real = jnp.maximum(jnp.sum(real, dtype=acc), 1.0)
    first = jnp.sum(chosen[0], axis=0) / n_real  # f_e: real tokens whose first choice is e
    mean_prob = jnp.sum(probs * real[:, None], axis=0) / n_real  # p_e
    aux = e * jnp.sum(first * mean_prob)
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * real) / n_real
    # Counts are exact integers in fp32; the difference is taken before dividing,
    # so nothing dropped reads exactly 0.
    dropped = (k * jnp.sum(real, dtype=acc) - jnp.sum(kept)) / (k * n_real)
    load = jnp.sum(chosen, axis=(0, 1)) / (k * n_real)  # (E,) before the capacity cut
    # The weighted losses are differentiated (p_e and the logits carry the
    # gradient; f_e, an argmax count, does not). Nothing is sown by init, so
    # ``model.init`` returns the parameters (and cache) only.
    if not self.is_initializing():
      self.sow("losses", "moe_aux_loss", (c.moe_aux_weight * aux).astype(jnp.float32))
      self.sow("losses", "moe_z_loss", (c.moe_z_weight * z).astype(jnp.float32))
      for name, value in (
        ("moe_aux_loss", aux),
        ("moe_z_loss", z),
        ("moe_dropped_fraction", dropped),
        ("moe_expert_load", load),
      ):
        self.sow("metrics", name, jax.lax.stop_gradient(value).astype(jnp.float32))

    policy = module_policy(self)
    # Each expert's weights [E, in, out]; the experts axis is a batch axis of the matmul.
    up = lambda name: Weight(name, (d,), (f,), ("expert", "embed", "mlp"), c.init_std, (e,))
    # GPT-2 scales the init of residual-branch outputs by 1/sqrt(2 * n_layers).
    std_out = c.init_std / (2 * c.n_layers) ** 0.5
    down = Weight("w_out", (f,), (d,), ("expert", "mlp", "embed"), std_out, (e,))
    tokens = policy.cast_to_compute(x.reshape(n, d))
    cdt = tokens.dtype
    # Gather each expert's slots: exact, every slot holds one token or zeros.
    expert_in = jnp.einsum("nec,nd->ecd", dispatch.astype(cdt), tokens)  # (E, C, d)
    expert_in = nn.with_logical_constraint(expert_in, ("expert", None, None))
    act = ACTIVATIONS[c.mlp]
    h = matmul(self, expert_in, up("w_in"))  # (E, C, f)
    if c.mlp in GATED_MLPS:
      h = act(matmul(self, expert_in, up("w_gate"))) * h
    else:
      h = act(h)
    h = nn.with_logical_constraint(h, ("expert", None, "mlp"))
    expert_out = matmul(self, h, down)  # (E, C, d)
    out = jnp.einsum("nec,ecd->nd", combine.astype(cdt), expert_out)  # gate-weighted sum
    out = policy.cast_to_output(out.reshape(b, t, d))
    return nn.Dropout(c.dropout)(out, deterministic=deterministic)
