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
from llm_mp.models import FAMILIES
from llm_mp.precision import loss_scale_kind
from llm_mp.tasks import TRANSIENT_COLLECTIONS


@struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed whole.

  Attributes:
    step: int32 ``[]``, optimizer steps attempted (skipped ones included).
    params: the model's parameters (plain arrays, in the policy's param dtype).
    opt_state: the optax state (moments in the params' dtypes, or in
      ``optim.state_dtype`` when that is not float32).
    loss_scale: a loss-scale pytree (``llm_mp.loss_scale``).
    rng: PRNG key; step ``s`` uses ``fold_in(rng, s)`` for dropout.
    skipped_steps: int32 ``[]``, steps whose gradients were non-finite.
    model_state: the model's non-parameter collections that steps update
      (e.g. fp8 scales and amax histories), ``{collection: tree}``; ``{}``
      for models without any.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: LossScale
  rng: jax.Array
  skipped_steps: jax.Array
  model_state: Any = struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params": params, **model_state}``: what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


def init_variables_fn(model: nn.Module, config: Config) -> Callable[[jax.Array], dict]:
  """``rng -> {"params": ..., **state collections}``, leaves in ``nn.LogicallyPartitioned``
  boxes where the model named their axes.

  The model is initialised on its family's example inputs of
  ``data.seq_len`` tokens; what a forward pass only records (the
  ``TRANSIENT_COLLECTIONS``: sown losses and metrics, caches) is dropped.
  """
  args = FAMILIES[config.model.family].example_inputs(config.data.seq_len)

  def init(rng: jax.Array) -> dict:
    variables = model.init({"params": rng}, *args)
    return {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}

  return init


def init_params_fn(model: nn.Module, config: Config) -> Callable[[jax.Array], Any]:
  """``rng -> params`` with ``nn.LogicallyPartitioned`` boxes (logical axis names)."""
  init = init_variables_fn(model, config)
  return lambda rng: init(rng)["params"]


def make_init_fn(
  model: nn.Module, tx: optax.GradientTransformation, config: Config
) -> Callable[[jax.Array], TrainState]:
  """``rng -> TrainState`` (plain arrays), to be jitted, possibly with out_shardings.

  Call ``jax.eval_shape`` on it to get the state's shapes without FLOPs.
  """
  init_variables = init_variables_fn(model, config)

  def init(rng: jax.Array) -> TrainState:
    param_rng, state_rng = jax.random.split(rng)
    variables = dict(nn.unbox(init_variables(param_rng)))
    params = variables.pop("params")
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      loss_scale=make_loss_scale(
        loss_scale_kind(config.precision.policy, config.precision.loss_scale),
        config.precision.init_loss_scale,
        config.precision.loss_scale_period,
      ),
      rng=state_rng,
      skipped_steps=jnp.zeros((), jnp.int32),
      model_state=variables,
    )

  return init


def param_count(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def bytes_per_param(state: TrainState) -> float:
  """(bytes of params + bytes of optimizer state) / number of params.

  ``state`` holds arrays or ``jax.ShapeDtypeStruct``s (``jax.eval_shape``),
  unsharded sizes. fp32 params with fp32 Adam moments give 12, bf16 params
  and moments 6, fp32 params with bf16 moments 8; the optimizer's step
  counts add a few bytes in all.
  """
  leaves = jax.tree.leaves((state.params, state.opt_state))
  return sum(x.size * x.dtype.itemsize for x in leaves) / param_count(state.params)
