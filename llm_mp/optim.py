"""optax chains from :class:`~llm_mp.config.OptimConfig`, and the parameter update.

The chain, in order:

1. global-norm clipping (``clip_norm``), of the fp32 gradients the train step
   has already unscaled, so the threshold applies to true gradients;
2. a cast of the gradients to the params' dtypes, so the optimizer state
   follows the params (fp32 params -> fp32 moments, bf16 -> bf16); with
   ``state_dtype=bf16`` instead, the optimizer of 3-4 is wrapped by
   :func:`with_state_dtype`: its moments are stored in bf16, its arithmetic
   is fp32 and its updates come out in fp32, whatever the params' dtype;
3. weight decay on the parameters :func:`decay_mask` selects: decoupled for
   ``adamw`` (``-lr * wd * p``, Loshchilov & Hutter); for the other optimizers
   an L2 term ``wd * p`` added to the gradient before them, as the
   ``weight_decay`` of ``torch.optim``'s Adam/SGD/RMSprop/Adagrad does;
4. the optimizer, with the learning rate from :func:`make_schedule`;
   for fine-tuning, parameters matching ``train.freeze`` get zero updates and
   the backbone's updates are scaled by ``train.backbone_lr_scale``
   (``optax.multi_transform`` over :func:`param_groups`).

Gradient accumulation is done by the train step (a scan over micro-batches),
so one ``update`` is one optimizer step. optax counts only the updates the
train step keeps, so the lr of a step is ``schedule(step - skipped_steps)``.

The train step applies the updates with :func:`apply_updates`: ``p + u`` in
the params' dtype, rounded to nearest, or for bf16 params with
``stochastic_rounding`` rounded by :func:`stochastic_round`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from llm_mp.config import OptimConfig
from llm_mp.precision import parse_dtype

EMBEDDING_LEAVES = ("embedding", "pos_embedding")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """``count -> lr`` (fp32 ``[]``).

  Linear warm-up from 0 to ``cfg.lr`` over ``warmup_steps``, then cosine or
  linear decay reaching ``lr * end_lr_ratio`` at ``total_steps`` (and staying
  there), or constant ``lr``. ``cfg.schedule_steps``, when set, replaces
  ``total_steps`` (a run's schedule is fixed when it is created).
  """
  if cfg.schedule_steps is not None:
    total_steps = cfg.schedule_steps
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_ratio, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.lr)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
  """Which parameters get weight decay: a tree of bools shaped like ``params``.

  Excluded unless ``decay_norms``/``decay_biases``/``decay_embeddings`` say
  otherwise: norm parameters (a path component containing "norm"), biases
  (leaf "bias") and embeddings (leaves "embedding", "pos_embedding"). Only
  dict keys count as path components, so plain arrays and arrays boxed in
  ``nn.LogicallyPartitioned`` (whose mask keeps the box) give the same answer.
  """

  def decays(path, _leaf) -> bool:
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if any("norm" in name for name in names):
      return cfg.decay_norms
    if names[-1] == "bias":
      return cfg.decay_biases
    if names[-1] in EMBEDDING_LEAVES:
      return cfg.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def cast_to_params() -> optax.GradientTransformation:
  """Casts each update to its parameter's dtype; needs ``params`` in ``update``."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("cast_to_params needs the params passed to update")
    return optax.tree_utils.tree_cast_like(updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _cast_floats(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating leaves cast to ``dtype`` (integer counts kept)."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def with_state_dtype(
  inner: optax.GradientTransformation, dtype: Any
) -> optax.GradientTransformation:
  """``inner`` with every floating leaf of its state (Adam's mu and nu, momentum
  traces, Adagrad's sums) stored in ``dtype``.

  Each ``update`` casts the state and the incoming updates up to fp32, runs
  ``inner`` in fp32 and casts the new state back down to ``dtype``; the
  updates it returns are fp32. Integer leaves (step counts) are untouched.
  """

  def init(params):
    return _cast_floats(inner.init(params), dtype)

  def update(updates, state, params=None):
    up = lambda tree: _cast_floats(tree, jnp.float32)
    updates, state = inner.update(up(updates), up(state), params)
    return updates, _cast_floats(state, dtype)

  return optax.GradientTransformation(init, update)


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """fp32 ``[...]`` -> bf16 ``[...]``, rounded up or down at random so that ``E[result] = x``.

  A bf16 value is the top 16 bits of an fp32 one. Adding 16 uniform random
  bits to the low half of ``x``'s bit pattern and truncating rounds its
  magnitude up with probability (distance to the lower bf16 neighbour) / (bf16
  spacing). Floats are sign-magnitude, so a negative ``x`` rounds towards
  -inf with that same probability, and the carry never reaches the sign bit
  (the largest finite magnitude, 0x7F7FFFFF, plus 0xFFFF stays below 2**31).
  Values already in bf16 are unchanged; inf and nan pass through.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16  # uniform in [0, 0xFFFF]
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)  # the cast is exact


def apply_updates(params: Any, updates: Any, rng: jax.Array | None = None) -> Any:
  """``params + updates``, each leaf stored back in its param's dtype.

  Without ``rng``: ``optax.apply_updates`` (round to nearest). With ``rng``:
  a bf16 param becomes ``stochastic_round(fp32(p) + fp32(u))``, with one key
  per leaf split from ``rng``; params of other dtypes (fp32) are updated
  exactly as without ``rng``.
  """
  if rng is None:
    return optax.apply_updates(params, updates)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))

  def one(p, u, key):
    if p.dtype != jnp.bfloat16:
      return jnp.asarray(p + u).astype(p.dtype)  # as optax.apply_updates
    return stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32), key)

  new = [one(p, u, k) for p, u, k in zip(leaves, treedef.flatten_up_to(updates), keys)]
  return jax.tree.unflatten(treedef, new)


def _optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer proper (adamw with its decoupled decay), without clipping."""
  momentum = cfg.momentum or None  # 0 means plain, stateless SGD / RMSprop
  if cfg.name == "adamw":
    return optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=lambda p: decay_mask(p, cfg),
    )
  if cfg.name == "adam":
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "sgd":
    return optax.sgd(schedule, momentum=momentum)
  if cfg.name == "rmsprop":
    # b2 is the squared-gradient decay, as in Adam; eps inside the sqrt (optax's default).
    return optax.rmsprop(schedule, decay=cfg.b2, eps=cfg.eps, momentum=momentum)
  # adagrad (OptimConfig has validated the name); accumulator starts at optax's 0.1.
  return optax.adagrad(schedule, eps=cfg.eps)


def param_path(path: tuple) -> str:
  """A ``tree_flatten_with_path`` key path as ``"decoder/blocks_0/attn/query/kernel"``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_groups(
  params: Any, freeze: Sequence[str], head_names: Sequence[str], split_backbone: bool
) -> Any:
  """Labels each parameter "frozen" (its path matches a ``freeze`` fnmatch
  pattern), "backbone" (not under a top-level ``head_names`` module, when
  ``split_backbone``) or "head"."""

  def label(path, _):
    name = param_path(path)
    if any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
      return "frozen"
    if split_backbone and name.split("/", 1)[0] not in head_names:
      return "backbone"
    return "head"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  cfg: OptimConfig,
  total_steps: int,
  *,
  freeze: Sequence[str] = (),
  backbone_lr_scale: float = 1.0,
  head_names: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain described in the module docstring, and its schedule.

  Args:
    cfg: the optimizer section of the config.
    total_steps: optimizer updates in the run (where the decay ends).
    freeze: fnmatch patterns on '/'-joined parameter paths: those parameters
      get zero updates (and no optimizer state).
    backbone_lr_scale: learning-rate multiplier of every parameter not under
      a top-level module named in ``head_names`` (fine-tuning).
    head_names: the task-head modules (``llm_mp.models.HEAD_PARAMS``).

  Returns:
    ``(tx, schedule)``. ``tx.update(grads, opt_state, params)`` needs
    ``params``; ``schedule(count)`` is the lr of the ``count``-th applied update.
    Clipping uses the global norm of all (also frozen) gradients.
  """
  schedule = make_schedule(cfg, total_steps)
  links = []
  if cfg.clip_norm is not None:
    links.append(optax.clip_by_global_norm(cfg.clip_norm))
  update = [_optimizer(cfg, schedule)]
  if cfg.name != "adamw" and cfg.weight_decay > 0:
    update.insert(0, optax.add_decayed_weights(cfg.weight_decay, lambda p: decay_mask(p, cfg)))
  state_dtype = parse_dtype(cfg.state_dtype)
  if state_dtype == jnp.float32:  # the state follows the params
    links.append(cast_to_params())
  else:
    update = [with_state_dtype(t, state_dtype) for t in update]
  if freeze or backbone_lr_scale != 1.0:
    # Only then: a plain chain keeps the optimizer state of existing runs unchanged.
    head = optax.chain(*update)
    groups = {
      "head": head,
      "frozen": optax.set_to_zero(),
      "backbone": optax.chain(head, optax.scale(backbone_lr_scale)),
    }
    links.append(
      optax.multi_transform(
        groups,
        lambda p: param_groups(p, tuple(freeze), tuple(head_names), backbone_lr_scale != 1.0),
      )
    )
  else:
    links.extend(update)
  return optax.chain(*links), schedule
