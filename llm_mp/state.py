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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_mp import sharding
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


def _init_boxed_fn(
  model: nn.Module, tx: optax.GradientTransformation, config: Config
) -> Callable[[jax.Array], tuple[dict, TrainState]]:
  """``rng -> (boxed variables, TrainState)``: the variables as the model made them
  (``nn.LogicallyPartitioned`` boxes carrying their axis names) and the state built
  from them. One trace gives both: :func:`abstract_train_state` reads the axis names
  of the first and the shapes of the second."""
  init_variables = init_variables_fn(model, config)

  def init(rng: jax.Array) -> tuple[dict, TrainState]:
    param_rng, state_rng = jax.random.split(rng)
    boxed = init_variables(param_rng)
    variables = dict(nn.unbox(boxed))
    params = variables.pop("params")
    return boxed, TrainState(
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


def make_init_fn(
  model: nn.Module, tx: optax.GradientTransformation, config: Config
) -> Callable[[jax.Array], TrainState]:
  """``rng -> TrainState`` (plain arrays), to be jitted, possibly with out_shardings.

  Call ``jax.eval_shape`` on it to get the state's shapes without FLOPs.
  """
  init = _init_boxed_fn(model, tx, config)

  def init_state(rng: jax.Array) -> TrainState:
    return init(rng)[1]

  return init_state


def abstract_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: Config,
  mesh: Mesh,
  rng: jax.Array,
) -> TrainState:
  """The TrainState as ``jax.ShapeDtypeStruct`` leaves carrying their target shardings.

  No FLOPs and no device memory: the target for :func:`create_sharded_state`
  and for ``checkpoint.restore_latest``. Parameters follow the rules (validated
  with :func:`check_divisible`); optimizer-state leaves that mirror a parameter
  (moments, traces) take that parameter's sharding; the model's non-parameter
  collections follow their logical names where they have them; everything
  else (counts, step, loss scale, rng) is replicated.
  """
  rules = sharding.logical_rules(config.mesh)
  boxed, shapes = jax.eval_shape(_init_boxed_fn(model, tx, config), rng)
  sharding.check_divisible(boxed, mesh, rules)
  variable_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  param_shardings = variable_shardings.pop("params")
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, shapes).replace(
    params=param_shardings,
    model_state=variable_shardings,
    opt_state=sharding.follow_params(shapes.opt_state, shapes.params, param_shardings, replicated),
  )
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def create_sharded_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: Config,
  mesh: Mesh,
  rng: jax.Array,
  params: Any = None,
  abstract: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
  """Initialises the TrainState directly in its sharded layout.

  Args:
    model, tx, config: as for ``state.make_init_fn``.
    mesh: from :func:`llm_mp.sharding.make_mesh`.
    rng: PRNG key (the same on every process).
    params: the parameters to start from (arrays of the shapes and dtypes the
      config builds, laid out as ``abstract.params``), or None for a fresh
      initialisation. Given parameters get a fresh optimizer state of their own;
      the random initialisation of parameters is then dead code, which the
      compiler drops.
    abstract: :func:`abstract_train_state` of the same arguments, when the caller
      has it already (saves tracing the model again).

  Returns:
    ``(state, shardings)``: the state, each leaf a global ``jax.Array`` laid
    out as :func:`abstract_train_state` says (no device ever holds it whole),
    and the matching tree of ``NamedSharding`` for :func:`llm_mp.sharding.jit_train_step`.

  Raises:
    ValueError: a sharded axis is not divisible by its mesh axes.
  """
  if abstract is None:
    abstract = abstract_train_state(model, tx, config, mesh, rng)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  init = make_init_fn(model, tx, config)
  rules = sharding.logical_rules(config.mesh)
  if params is None:
    return jax.jit(sharding.with_rules(init, mesh, rules), out_shardings=shardings)(rng), shardings

  def init_around(rng: jax.Array, params: Any) -> TrainState:
    return init(rng).replace(params=params, opt_state=tx.init(params))

  create = jax.jit(
    sharding.with_rules(init_around, mesh, rules),
    in_shardings=(None, shardings.params),
    out_shardings=shardings,
  )
  return create(rng, params), shardings


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
