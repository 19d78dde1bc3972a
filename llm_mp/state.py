"""The one pytree of mutable training state, and its shape-first init.

Static things (the model, the optimizer, the precision policy) stay outside
the leaves: they are passed to the step builders instead.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm_mp.config import Config
from llm_mp.loss_scale import LossScale, make_loss_scale
from llm_mp.precision import Precision


@struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed whole.

  Attributes:
    step: int32 ``[]``, optimizer steps attempted (skipped ones included).
    params: the model's parameters (plain arrays, in the policy's param dtype).
    opt_state: the optax state (moments in the params' dtypes).
    loss_scale: a loss-scale pytree (``llm_mp.loss_scale``).
    rng: PRNG key; step ``s`` uses ``fold_in(rng, s)`` for dropout.
    skipped_steps: int32 ``[]``, steps whose gradients were non-finite.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: LossScale
  rng: jax.Array
  skipped_steps: jax.Array


def init_params_fn(model: nn.Module, seq_len: int) -> Callable[[jax.Array], Any]:
  """``rng -> params`` with ``nn.LogicallyPartitioned`` boxes (logical axis names)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return lambda rng: model.init({"params": rng}, tokens)["params"]


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, precision: Precision,
                 config: Config) -> Callable[[jax.Array], TrainState]:
  """``rng -> TrainState`` (plain arrays), to be jitted, possibly with out_shardings.

  Call ``jax.eval_shape`` on it to get the state's shapes without FLOPs.
  """
  init_params = init_params_fn(model, config.data.seq_len)

  def init(rng: jax.Array) -> TrainState:
    param_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(init_params(param_rng))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        loss_scale=make_loss_scale(precision.loss_scale, config.train.init_loss_scale,
                                   config.train.loss_scale_period),
        rng=state_rng,
        skipped_steps=jnp.zeros((), jnp.int32),
    )

  return init


def param_count(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
