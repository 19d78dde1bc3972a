"""optax chains from :class:`~llm_mp.config.OptimConfig`.

The chain is: global-norm clipping (of gradients the train step has already
unscaled), the optimizer, decoupled weight decay on the parameters the mask
selects, and the learning-rate schedule. Gradient accumulation is done by the
train step (a scan over micro-batches), so one ``update`` is one optimizer step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from llm_mp.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine, linear
  (both to ``lr * end_lr_ratio`` at ``total_steps``) or constant."""
  end = cfg.lr * cfg.end_lr_ratio
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.lr)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
  """Tree of bools: which parameters get weight decay.

  Excluded unless the config says otherwise: norm parameters (any path
  component containing "norm"), biases (leaf "bias") and embeddings (leaves
  "embedding" and "pos_embedding").
  """

  def keep(path, _leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any("norm" in n for n in names[:-1]):
      return cfg.decay_norms
    if names[-1] == "bias":
      return cfg.decay_biases
    if names[-1] in ("embedding", "pos_embedding"):
      return cfg.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, schedule)``; ``schedule(count)`` is the lr of update ``count``."""
  schedule = make_schedule(cfg, total_steps)
  mask = lambda params: decay_mask(params, cfg)
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=mask)
  else:
    base = {
        "adam": lambda: optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        "sgd": lambda: optax.sgd(schedule, momentum=cfg.momentum or None),
        "rmsprop": lambda: optax.rmsprop(schedule, eps=cfg.eps, momentum=cfg.momentum or None),
        "adagrad": lambda: optax.adagrad(schedule, eps=cfg.eps),
    }[cfg.name]()
    decay = (optax.add_decayed_weights(cfg.weight_decay, mask) if cfg.weight_decay
             else optax.identity())
    # Decoupled decay, scaled by the lr like AdamW's: -lr * (update + wd * p).
    opt = optax.chain(decay, base) if cfg.name == "sgd" else optax.chain(
        base, optax.add_decayed_weights(-cfg.weight_decay, mask) if cfg.weight_decay
        else optax.identity())
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*parts, opt), schedule
