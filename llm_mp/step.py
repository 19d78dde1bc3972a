"""Loss, ``train_step`` and ``eval_step``: pure functions, jitted by the caller.

The train step follows jmp's recipe: scale the loss, take gradients (summed
over micro-batches), unscale, check finiteness, clip (first link of the optax
chain), update; when any gradient is non-finite the parameters and optimizer
state are kept bit for bit, the dynamic scale shrinks and ``skipped_steps``
counts it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_mp.config import Config
from llm_mp.loss_scale import all_finite, select_tree
from llm_mp.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Token cross-entropy, always in fp32.

  Args:
    logits: ``[B, T, V]`` any float dtype (cast to fp32 here: the loss is kept
      in fp32 under every policy).
    targets: int ``[B, T]``; negative entries are ignored.
    mask: ``[B, T]`` bool or 0/1, extra loss mask (e.g. padding).

  Returns:
    ``(nll_sum, z_sum, count)`` fp32 scalars: summed ``-log p(target)``, summed
    ``log(Z)^2`` (for z-loss) and the number of counted tokens.
  """
  logits = logits.astype(jnp.float32)
  weights = (mask.astype(bool) & (targets >= 0)).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
  target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * weights
  return nll.sum(), (jnp.square(log_z) * weights).sum(), weights.sum()


def loss_mask(batch: Batch) -> jax.Array:
  """Tokens that count: targets >= 0 and not padding (segment id 0)."""
  mask = batch["targets"] >= 0
  if "segment_ids" in batch:
    mask &= batch["segment_ids"] > 0
  return mask


def _forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
  deterministic = rng is None
  return model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                     positions=batch.get("positions"), deterministic=deterministic,
                     rngs=None if deterministic else {"dropout": rng})


def _split_micro(batch: Batch, k: int) -> Batch:
  """``[B, ...]`` -> ``[k, B/k, ...]`` (micro-batch i = rows i*B/k..(i+1)*B/k-1)."""
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def _zero_fraction(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in leaves)
  return zeros / sum(x.size for x in leaves)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: Config
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  ``batch``: int32 ``inputs, targets, segment_ids, positions`` of ``[B, T]``
  (``segment_ids``/``positions`` optional). ``metrics``: fp32/int scalars
  ``loss, grad_norm, lr, loss_scale, grads_finite, grad_zero_fraction,
  skipped_steps, tokens``.
  Jit it once with ``donate_argnums=0``.
  """
  k = config.optim.grad_accum_steps
  z_weight = config.train.z_loss
  use_dropout = config.model.dropout > 0

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    n_tokens = jnp.maximum(loss_mask(batch).sum(), 1).astype(jnp.float32)

    def scaled_loss(params, micro, micro_rng):
      logits = _forward(model, params, micro, micro_rng)
      nll, z, _ = cross_entropy(logits, micro["targets"], loss_mask(micro))
      # Dividing by the whole batch's token count makes micro-batch gradients sum
      # to exactly the gradient of the full-batch mean.
      loss = (nll + z_weight * z) / n_tokens
      return state.loss_scale.scale(loss), nll

    grad_fn = jax.grad(scaled_loss, has_aux=True)
    if k == 1:
      grads, nll = grad_fn(state.params, batch, rng)
    else:
      def accumulate(carry, xs):
        micro, i = xs
        micro_rng = None if rng is None else jax.random.fold_in(rng, i)
        g, nll = grad_fn(state.params, micro, micro_rng)
        return jax.tree.map(jnp.add, carry, (g, nll)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
      (grads, nll), _ = jax.lax.scan(accumulate, zeros, (_split_micro(batch, k), jnp.arange(k)))

    grads = state.loss_scale.unscale(grads)
    finite = all_finite(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=select_tree(finite, new_params, state.params),
        opt_state=select_tree(finite, new_opt_state, state.opt_state),
        loss_scale=state.loss_scale.adjust(finite),
        skipped_steps=skipped,
    )
    metrics = {
        "loss": nll / n_tokens,
        "grad_norm": optax.tree.norm(grads),
        # optax counts applied updates only, so the lr follows step - skipped.
        "lr": schedule(state.step - state.skipped_steps),
        "loss_scale": state.loss_scale.loss_scale,
        "grads_finite": finite,
        # Fraction of gradient entries exactly zero: fp16 underflow shows up here.
        "grad_zero_fraction": _zero_fraction(grads),
        "skipped_steps": skipped,
        "tokens": n_tokens,
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Builds ``eval_step(params, batch) -> {"loss_sum", "tokens"}`` (fp32 sums).

  Summing over batches and dividing once gives the exact corpus perplexity
  ``exp(loss_sum / tokens)``.
  """

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    logits = _forward(model, params, batch, None)
    nll, _, count = cross_entropy(logits, batch["targets"], loss_mask(batch))
    return {"loss_sum": nll, "tokens": count}

  return eval_step
