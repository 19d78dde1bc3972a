"""``train_step`` and ``eval_step`` for any task: pure functions, jitted by the caller.

The loss is the task's (:mod:`llm_mp.tasks`: LM, masked LM, classification,
...), so one step serves every model family. The train step follows jmp's
recipe: scale the loss, take gradients (combined over micro-batches), unscale,
check finiteness, clip (first link of the optax chain), update; when any
gradient is non-finite the parameters, optimizer state and model state are
kept bit for bit, the dynamic scale shrinks and ``skipped_steps`` counts it.
With ``optim.stochastic_rounding`` bf16 parameters are updated with stochastic
rounding keyed by the state's rng and step, so a run stays deterministic and
resumes exactly.

The state collections whose formats overwrite them with their gradient
(``llm_mp.formats.state_collections(overwrite=True)``: the fp8 scales and amax
histories, :mod:`llm_mp.formats.fp8`) are differentiated with the parameters: their
gradient is their new value. It goes neither to the optimizer nor through the
loss scale; over micro-batches the new values are combined by their
elementwise maximum (each micro-batch starts from the same old values, so a
history's newest amax becomes the whole batch's).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_mp.config import Config
from llm_mp.formats import state_collections
from llm_mp.loss_scale import all_finite, select_tree
from llm_mp.optim import apply_updates
from llm_mp.state import TrainState
from llm_mp.tasks import Batch, Task, cross_entropy, loss_mask, make_task

__all__ = ["cross_entropy", "loss_mask", "make_eval_step", "make_train_step"]


def _split_state(model_state: dict) -> tuple[dict, dict]:
  """``(overwritten by gradient, the rest)``: ``model_state`` split by collection.

  Overwritten are the collections whose gradient is their new value (flax's
  "overwrite with gradient"): custom VJPs return the updated state as the
  cotangent of the old one."""
  overwrite = state_collections(overwrite=True)
  over = {k: v for k, v in model_state.items() if k in overwrite}
  return over, {k: v for k, v in model_state.items() if k not in over}


def _split_micro(batch: Batch, k: int) -> Batch:
  """``[B, ...]`` -> ``[k, B/k, ...]`` (micro-batch i = rows i*B/k..(i+1)*B/k-1)."""
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def _zero_fraction(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in leaves)
  return zeros / sum(x.size for x in leaves)


def _layer_name(path: tuple) -> str:
  """'decoder/blocks_3' for a block's parameters, else the top-level module ('embed')."""
  keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return "/".join(keys[:2]) if len(keys) > 2 and keys[1].startswith("blocks") else keys[0]


def zero_fraction_by_layer(grads: Any) -> dict[str, jax.Array]:
  """``{"grad_zero_fraction/<layer>": fp32 []}``: the fraction of each layer's
  gradient entries that are exactly zero (fp16 underflow, layer by layer).
  Blocks are layers ``decoder/blocks_i``; scanned blocks are one ``decoder/blocks``."""
  counts: dict[str, list] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    zeros, size = counts.setdefault(_layer_name(path), [0.0, 0])
    counts[_layer_name(path)] = [zeros + jnp.sum(g == 0, dtype=jnp.float32), size + g.size]
  return {f"grad_zero_fraction/{k}": z / n for k, (z, n) in counts.items()}


def _weighted(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Metrics times the micro-batch's weight, so sums over micro-batches / the
  total weight are exact batch means."""
  w = aux["weight"]
  return {k: v * w for k, v in aux.items() if k not in ("weight", "model_state")}


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  config: Config,
  task: Task | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, batch, frozen=None) -> (state, metrics)``.

  Args:
    model, tx, schedule: the model, the optax chain and its schedule.
    config: the run's config (micro-batches, dropout).
    task: the loss; default ``make_task(config)`` (the LM task for decoders).

  ``batch``: the task's arrays (``task.batch_axes``), leading axis ``B``.
  ``frozen``: the task's read-only collections (``TaskSpec.frozen``, e.g. the
  distillation teacher): added to the loss's ``variables``, never differentiated
  and not part of the returned state (``sharding.jit_train_step`` passes them
  as a jit argument, so the caller still calls ``step(state, batch)``).
  ``metrics``: fp32/int scalars ``loss`` (the task loss, without auxiliary
  terms), ``grad_norm, lr, loss_scale, grads_finite, grad_zero_fraction,
  skipped_steps``, the count of ``task.unit`` (``tokens`` or ``examples``),
  task metrics (``accuracy``) and what modules recorded (``moe_*``); with
  ``train.layer_metrics``, ``grad_zero_fraction/<layer>`` per layer.
  With ``optim.grad_accum_steps = k`` the batch is split into k micro-batches
  whose gradients and metrics are combined weighted by their counts, which is
  exactly the full batch's mean. Jit it once with ``donate_argnums=0``.
  """
  task = task or make_task(config)
  k = config.optim.grad_accum_steps

  def train_step(state: TrainState, batch: Batch, frozen: dict[str, Any] | None = None):
    rng = jax.random.fold_in(state.rng, state.step)
    frozen = frozen or {}

    overwrite, kept = _split_state(state.model_state)

    def scaled_loss(diff, kept, micro, micro_rng):
      # diff = (params, overwrite): both differentiated; kept: the other collections.
      variables = {"params": diff[0], **kept, **diff[1], **frozen}
      loss, aux = task.loss_fn(model, variables, micro, micro_rng)
      aux = {**aux, "model_state": _split_state(aux["model_state"])[1]}
      return state.loss_scale.scale(loss), aux

    grad_fn = jax.grad(scaled_loss, has_aux=True)
    if k == 1:
      (grads, new_overwrite), aux = grad_fn((state.params, overwrite), kept, batch, rng)
      weight, sums, new_kept = aux["weight"], _weighted(aux), aux["model_state"]
    else:

      def accumulate(carry, xs):
        g_sum, o_max, w_sum, m_sum, kept = carry
        micro, i = xs
        (g, o), aux = grad_fn((state.params, overwrite), kept, micro, jax.random.fold_in(rng, i))
        w = aux["weight"]
        g_sum = jax.tree.map(lambda a, b: a + b * w.astype(b.dtype), g_sum, g)
        o_max = jax.tree.map(jnp.maximum, o_max, o)
        m_sum = jax.tree.map(jnp.add, m_sum, _weighted(aux))
        return (g_sum, o_max, w_sum + w, m_sum, aux["model_state"]), None

      micro = _split_micro(batch, k)
      first = jax.tree.map(lambda x: x[0], micro)
      m_shapes = jax.eval_shape(
        lambda: _weighted(grad_fn((state.params, overwrite), kept, first, rng)[1])
      )
      zeros = (
        jax.tree.map(jnp.zeros_like, state.params),
        jax.tree.map(lambda x: jnp.full_like(x, -jnp.inf), overwrite),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shapes),
        kept,
      )
      (grads, new_overwrite, weight, sums, new_kept), _ = jax.lax.scan(
        accumulate, zeros, (micro, jnp.arange(k))
      )
      grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0).astype(g.dtype), grads)
    model_state = {**new_kept, **new_overwrite}

    grads = state.loss_scale.unscale(grads)
    finite = all_finite(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    # Micro-batches take rng or fold_in(rng, i < k); rounding takes fold_in(rng, k).
    round_rng = jax.random.fold_in(rng, k) if config.optim.stochastic_rounding else None
    new_params = apply_updates(state.params, updates, round_rng)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    new_state = state.replace(
      step=state.step + 1,
      params=select_tree(finite, new_params, state.params),
      opt_state=select_tree(finite, new_opt_state, state.opt_state),
      loss_scale=state.loss_scale.adjust(finite),
      skipped_steps=skipped,
      model_state=select_tree(finite, model_state, state.model_state),
    )
    n = jnp.maximum(weight, 1.0)
    metrics = {name: v / n for name, v in sums.items()}
    metrics.update(
      {
        "grad_norm": optax.tree.norm(grads),
        # optax counts applied updates only, so the lr follows step - skipped.
        "lr": schedule(state.step - state.skipped_steps),
        "loss_scale": state.loss_scale.loss_scale,
        "grads_finite": finite,
        # Fraction of gradient entries exactly zero: fp16 underflow shows up here.
        "grad_zero_fraction": _zero_fraction(grads),
        "skipped_steps": skipped,
        task.unit: weight,
      }
    )
    if config.train.layer_metrics:
      metrics.update(zero_fraction_by_layer(grads))
    return new_state, metrics

  return train_step


def make_eval_step(
  model: nn.Module, task: Task | None = None, config: Config | None = None
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Builds ``eval_step(variables, batch) -> sums`` (fp32 scalars).

  Args:
    model: the model.
    task: the loss (default: the LM task).
    config: used only to build the default task (its z-loss weight is not
      part of the reported loss anyway).

  ``variables`` is ``state.variables`` (or a bare params tree). The result has
  ``loss_sum`` (the task loss summed over counted units), the count under
  ``task.unit`` and ``<metric>_sum`` for each task metric (e.g.
  ``accuracy_sum``): summing over batches and dividing once by the count gives
  exact corpus means (``exp(loss_sum / tokens)`` is the perplexity).
  """
  task = task or make_task(config or Config())

  def eval_step(variables: Any, batch: Batch) -> dict[str, jax.Array]:
    if "params" not in variables:
      variables = {"params": variables}
    _, aux = task.loss_fn(model, variables, batch, None)
    sums = {k: v for k, v in _weighted(aux).items() if jnp.ndim(v) == 0}
    out = {f"{k}_sum": v for k, v in sums.items() if k != "loss"}
    return {"loss_sum": sums["loss"], task.unit: aux["weight"], **out}

  return eval_step
