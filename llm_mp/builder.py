"""The one place a run is built from a config.

:func:`build_recipe` turns a :class:`~llm_mp.config.Config` into the static
pieces of a run: precision policy, task (loss and batch layout), model (by
``model.family``, with the head the task reads), optimizer and schedule. The
training loop, evaluation, generation, the benchmark and the tests all build
through it, so a new family, task or optimizer option reaches every caller.

:func:`load_backbone` is fine-tuning's start: the parameters of another run's
latest checkpoint, minus its task heads, placed into a fresh state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_mp import checkpoint, sharding
from llm_mp.config import Config, ModelConfig
from llm_mp.models import HEAD_PARAMS, build_model
from llm_mp.optim import make_optimizer, param_path
from llm_mp.precision import FormatOptions, Precision, make_precision
from llm_mp.tasks import Task, make_task


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything static a step needs; the mutable part is the TrainState.

  Attributes:
    config: the run's config.
    precision: the number formats of ``config.precision`` (:func:`run_precision`).
    task: loss function and batch layout (``train.task``).
    model: the flax module of ``model.family`` with the task's head.
    tx, schedule: the optax chain (freezing and backbone lr included) and
      its learning-rate schedule.
  """

  config: Config
  precision: Precision
  task: Task
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def freeze_patterns(config: Config) -> tuple[str, ...]:
  """``train.freeze`` split into fnmatch patterns (comma-separated)."""
  return tuple(p.strip() for p in config.train.freeze.split(",") if p.strip())


def edge_patterns(config: Config) -> tuple[str, ...]:
  """Module patterns of the first and last block of each stack and of the heads: where
  ``precision.formats`` does not reach unless ``precision.format_edges``."""
  m = config.model
  stacks = {"*": m.n_layers}
  if m.family == "encoder_decoder":
    stacks = {"encoder/*": m.n_layers, "decoder/*": m.decoder_layers}
  blocks = tuple(f"{stack}blocks_{i}/*" for stack, n in stacks.items() for i in sorted({0, n - 1}))
  return blocks + tuple(f"{head}*" for head in HEAD_PARAMS)


def run_precision(config: Config) -> Precision:
  """The :class:`Precision` of ``config.precision`` (policy, overrides, loss scale,
  matmul formats and their settings). ValueError names a bad spec."""
  p = config.precision
  options = FormatOptions(
    fp8_scaling=p.fp8_scaling,
    amax_history=p.amax_history,
    fp8_margin=p.fp8_margin,
    int8_activations=p.int8_activations,
    group_size=p.group_size,
  )
  return make_precision(
    p.policy,
    overrides=p.overrides,
    formats=p.formats,
    # The MoE router keeps the dtype policy's fp32 whatever the formats say.
    protected=("*router*",) + (() if p.format_edges else edge_patterns(config)),
    format_options=options,
  )


def resolve_backend_choices(
  config: Config, precision: Precision, backend: str | None = None
) -> Config:
  """``config`` with its model's "auto" implementation choices made for
  ``backend`` (:func:`resolve_model_choices`)."""
  model = resolve_model_choices(config.model, precision, backend)
  return config if model is config.model else dataclasses.replace(config, model=model)


def resolve_model_choices(
  model: ModelConfig, precision: Precision, backend: str | None = None
) -> ModelConfig:
  """``model`` with its "auto" implementation choices made for ``backend``
  (default: ``jax.default_backend()``).

  ``model.attention_impl="auto"`` becomes "cudnn" (flash attention, no
  ``T x T`` scores in memory) on a GPU when the compute dtype is bf16 or fp16,
  the dtypes that kernel takes, and "xla" otherwise.
  """
  if model.attention_impl != "auto":
    return model
  backend = backend or jax.default_backend()
  half = jnp.dtype(precision.compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  impl = "cudnn" if backend == "gpu" and half else "xla"
  return dataclasses.replace(model, attention_impl=impl)


def build_resolved_model(
  model: ModelConfig, precision: Precision, head: str = "lm", decode: bool = False
) -> nn.Module:
  """The flax module of ``model`` (by ``model.family``) under ``precision``, its
  "auto" choices resolved for this backend (:func:`resolve_model_choices`).

  For callers that hold a model config and a policy but no run config
  (generation, numerics); :func:`build_recipe` builds a whole run's.
  """
  return build_model(resolve_model_choices(model, precision), precision, head=head, decode=decode)


def build_recipe(config: Config, tokenizer: Any = None, decode: bool = False) -> Recipe:
  """The static pieces of a run of ``config``.

  The recipe's config has the "auto" choices resolved for this backend
  (:func:`resolve_backend_choices`).

  Args:
    config: the run's config.
    tokenizer: the run's tokenizer (needed by the ``mlm`` task for its
      special ids; others ignore it).
    decode: build the model in KV-cache decoding mode (generation).

  Raises:
    ValueError: an invalid precision spec, or a task the family cannot run.
  """
  precision = run_precision(config)
  config = resolve_backend_choices(config, precision)
  task = make_task(config, tokenizer)
  model = build_model(config.model, precision, head=task.head, decode=decode)
  tx, schedule = make_optimizer(
    config.optim,
    config.train.steps,
    freeze=freeze_patterns(config),
    backbone_lr_scale=config.train.backbone_lr_scale,
    head_names=HEAD_PARAMS,
  )
  return Recipe(config, precision, task, model, tx, schedule)


def _is_head(path: str) -> bool:
  return path.split("/", 1)[0] in HEAD_PARAMS


def load_backbone(params: Any, source_params: Any, source: str) -> Any:
  """``params`` with every backbone (non-head) leaf replaced by ``source_params``'.

  Args:
    params: the fresh parameters of the fine-tuning run.
    source_params: parameters restored from the source run (its own heads
      are ignored).
    source: the source run's directory (for errors).

  Returns:
    The new parameters: backbone from the source (same shardings as
    ``params``), heads as initialised in ``params``.

  Raises:
    ValueError: a backbone parameter is missing from the source or has
      another shape (the message names the path and both shapes). Another
      dtype is cast to this run's parameter dtype.
  """
  flat_src = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(source_params)[0]}

  def pick(path, fresh):
    name = param_path(path)
    if _is_head(name):
      return fresh
    if name not in flat_src:
      raise ValueError(
        f"train.init_from={source}: the source run has no parameter {name!r} "
        "(a different model family or architecture)"
      )
    src = flat_src[name]
    if src.shape != fresh.shape:
      raise ValueError(
        f"train.init_from={source}: parameter {name!r} is "
        f"{src.dtype}{list(src.shape)} there but {fresh.dtype}"
        f"{list(fresh.shape)} here"
      )
    # Another param dtype (fp32 source, pure_bf16 fine-tuning) is cast, as the policy says.
    return jax.device_put(src.astype(fresh.dtype), fresh.sharding)

  return jax.tree_util.tree_map_with_path(pick, params)


def check_init_from(config: Config, source_config: Config, source: str) -> None:
  """Raises ValueError unless ``source_config``'s model can seed ``config``'s.

  The family and every architecture field must agree; the head fields
  (``n_classes``, ``pool``) and training-only fields (dropout) may differ.
  """
  if source_config.model.family != config.model.family:
    raise ValueError(
      f"train.init_from={source}: its model.family="
      f"{source_config.model.family!r} differs from "
      f"model.family={config.model.family!r}"
    )
  free = {"n_classes", "pool", "dropout", "remat", "scan_layers", "attention_impl"}
  a, b = dataclasses.asdict(source_config.model), dataclasses.asdict(config.model)
  diff = [k for k in a if k not in free and a[k] != b[k]]
  if diff:
    k = diff[0]
    raise ValueError(
      f"train.init_from={source}: its model.{k}={a[k]!r} differs from "
      f"model.{k}={b[k]!r} ({len(diff)} differing field(s))"
    )


def restore_run_params(
  workdir: str, config: Config, mesh: Any, tokenizer: Any = None
) -> tuple[Any, int]:
  """The parameters of run ``workdir`` (whose config is ``config``), read
  from its newest checkpoint onto ``mesh`` without its optimizer state.

  Returns:
    ``(params, step)``.

  Raises:
    CheckpointError: the run has no readable checkpoint.
    ValueError: a config the builder rejects.
  """
  return checkpoint.restore_params(
    f"{workdir}/checkpoints", abstract_run_params(config, mesh, tokenizer)
  )


def abstract_run_params(config: Config, mesh: Any, tokenizer: Any = None) -> Any:
  """The parameters ``config``'s model has, as ``jax.ShapeDtypeStruct`` leaves with
  their shardings on ``mesh`` (no FLOPs, no device memory)."""
  recipe = build_recipe(config, tokenizer)
  abstract = sharding.abstract_train_state(
    recipe.model, recipe.tx, config, mesh, jax.random.key(config.train.seed)
  )
  return abstract.params
