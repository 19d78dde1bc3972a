"""The one place a run is built from a config.

:func:`build_recipe` turns a :class:`~llm_mp.config.Config` into the static
pieces of a run: precision policy, task (loss and batch layout), model (by
``model.family``, with the head the task reads), optimizer and schedule. The
training loop, evaluation, generation, the benchmark and the tests all build
through it, so a new family, task or optimizer option reaches every caller.

:func:`load_backbone` is fine-tuning's start: the parameters of another run's
latest checkpoint (read by ``llm_mp.rundir``), minus its task heads, placed into
a fresh state.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import optax

from llm_mp.config import Config
from llm_mp.formats import parse_formats, traced_matmuls
from llm_mp.models import FAMILIES, HEAD_MODULES, HEAD_PARAMS, build_model, resolve_model_choices
from llm_mp.optim import make_optimizer, param_path
from llm_mp.precision import Precision, make_precision, module_path
from llm_mp.tasks import Task, make_task, task_spec


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
  stacks = FAMILIES[config.model.family].stacks(config.model)
  blocks = tuple(f"{stack}blocks_{i}/*" for stack, n in stacks.items() for i in sorted({0, n - 1}))
  return blocks + tuple(f"{head}*" for head in HEAD_PARAMS)


def run_precision(config: Config) -> Precision:
  """The :class:`Precision` of ``config.precision`` (policy, overrides, loss scale,
  matmul formats and their settings). ValueError names a bad spec."""
  p = config.precision
  return make_precision(
    p.policy,
    overrides=p.overrides,
    formats=parse_formats(p.formats),
    # The MoE router keeps the dtype policy's fp32 whatever the formats say.
    protected=("*router*",) + (() if p.format_edges else edge_patterns(config)),
    format_options=p,
  )


def nearest_names(pattern: str, names: Iterable[str], n: int = 3) -> str:
  """The ``n`` names (paths, or their parts) most like ``pattern`` (difflib), quoted."""
  names = set(names)
  candidates = names | {part for name in names for part in name.split("/")}
  close = difflib.get_close_matches(pattern.strip("*"), sorted(candidates), n=n, cutoff=0.0)
  return ", ".join(repr(c) for c in close)


def _unmatched(field: str, patterns: Iterable[str], names: Sequence[str], what: str) -> None:
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
      raise ValueError(
        f"{field}: {pattern!r} matches no {what} of this model; nearest: "
        f"{nearest_names(pattern, names)}"
      )


def check_patterns(config: Config) -> None:
  """Checks the config's patterns against its model (one abstract ``init``, no FLOPs).

  Raises:
    ValueError: a ``train.freeze`` pattern that matches no parameter path, a
      ``precision.overrides`` pattern that matches no module, a ``precision.formats``
      pattern that matches no weight matmul, or formats that reach no matmul at all
      (the first and last block and the heads are kept unless
      ``precision.format_edges``); each names the nearest paths.
  """
  overrides = [i.split("=", 1)[0].strip() for i in config.precision.overrides.split(";")]
  pairs = parse_formats(config.precision.formats)
  if not (freeze_patterns(config) or any(overrides) or pairs):
    return  # nothing to check: no trace
  precision = run_precision(config)
  resolved = resolve_backend_choices(config, precision)
  model = build_model(resolved.model, precision, head=task_spec(config).head)
  inputs = FAMILIES[config.model.family].example_inputs(config.data.seq_len)
  called = set()

  def record(next_fun, args, kwargs, context):
    called.add(module_path(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record), traced_matmuls() as matmuls:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  params = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  _unmatched("train.freeze", freeze_patterns(config), params, "parameter path")
  _unmatched("precision.overrides", filter(None, overrides), sorted(called - {""}), "module")
  _unmatched("precision.formats", [p for p, _ in pairs], sorted(matmuls), "weight matmul")
  # "none" is the dtype policy alone: formats that name only it reach nothing on purpose.
  wanted = any(fmt != "none" for _, fmt in pairs)
  if wanted and all(fmt == "none" for fmt in matmuls.values()):
    raise ValueError(
      f"precision.formats={config.precision.formats!r} reaches none of the "
      f"{len(matmuls)} weight matmuls: the first and last block of each stack and the "
      "heads keep their float weights unless precision.format_edges=true"
    )


def module_paths(params: Any) -> list[str]:
  """The paths of the modules that hold ``params`` (arrays or shapes), and their parents."""
  paths = {
    param_path(p).rsplit("/", 1)[0] for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  return sorted(
    {"/".join(path.split("/")[: i + 1]) for path in paths for i in range(path.count("/") + 1)}
  )


def frozen_count(config: Config, params: Any) -> int:
  """How many parameter elements of ``params`` (arrays or shapes) ``train.freeze`` freezes."""
  freeze = freeze_patterns(config)
  return sum(
    math.prod(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if any(fnmatch.fnmatchcase(param_path(p), pat) for pat in freeze)
  )


def resolve_backend_choices(
  config: Config, precision: Precision, backend: str | None = None
) -> Config:
  """``config`` with its model's "auto" implementation choices made for
  ``backend`` (:func:`resolve_model_choices`)."""
  model = resolve_model_choices(config.model, precision, backend)
  return config if model is config.model else dataclasses.replace(config, model=model)


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


def _head(path: str) -> str | None:
  top = path.split("/", 1)[0]
  return top if top in HEAD_PARAMS else None


def kept_heads(config: Config, source_config: Config) -> tuple[str, ...]:
  """The head modules a fine-tuning run loads from its source run, by
  ``train.reinit_heads``: with "auto", the heads of this run's task when the
  source run's task reads the same head (LM into LM: the pretrained output layer
  of an untied LLaMA-family model is kept); "all" keeps none; a list of head
  modules re-initialises those and keeps the task's others.

  Raises:
    ValueError: a listed name that is not a head module.
  """
  option = config.train.reinit_heads.strip()
  ours = HEAD_MODULES[task_spec(config).head] if task_spec(config).head in HEAD_MODULES else ()
  if option == "auto":
    return ours if task_spec(source_config).head == task_spec(config).head else ()
  if option == "all":
    return ()
  names = {n.strip() for n in option.split(",") if n.strip()}
  unknown = sorted(names - set(HEAD_PARAMS))
  if unknown:
    raise ValueError(
      f"train.reinit_heads={option!r}: {unknown[0]!r} is not a head module; "
      f"use 'auto', 'all' or names from {list(HEAD_PARAMS)}"
    )
  return tuple(m for m in ours if m not in names)


def load_backbone(
  params: Any, source_params: Any, source: str, keep_heads: Sequence[str] = ()
) -> Any:
  """``params`` with every backbone leaf, and the leaves of the head modules in
  ``keep_heads``, replaced by ``source_params``'.

  Args:
    params: the fresh parameters of the fine-tuning run.
    source_params: parameters restored from the source run.
    source: the source run's directory (for errors).
    keep_heads: head modules (``lm_head``, ``classifier``...) to load too
      (:func:`kept_heads`); the other heads stay as initialised in ``params``.

  Returns:
    The new parameters, with the same shardings as ``params``.

  Raises:
    ValueError: a loaded parameter is missing from the source or has another
      shape (the message names the path and both shapes). Another dtype is
      cast to this run's parameter dtype.
  """
  flat_src = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(source_params)[0]}

  def pick(path, fresh):
    name = param_path(path)
    head = _head(name)
    if head is not None and head not in keep_heads:
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
