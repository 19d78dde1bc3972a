"""Sharded training over a device mesh: mesh, logical-axis rules, sharded jit.

The model names the axes of its parameters and activations ("embed", "heads",
"batch", ...); a rules table maps those logical names to the axes of a
``("data", "fsdp", "tensor")`` mesh, and the mesh sizes alone choose the
parallelism: ``data`` splits the batch, ``fsdp`` splits the batch and the
parameters / optimizer state (ZeRO-3), ``tensor`` splits heads, MLP units,
vocabulary and experts (Megatron). A mesh axis of size 1 shards nothing.

State is built shape-first and never whole on one device:
``jax.eval_shape(init)`` -> logical partition specs -> ``NamedSharding`` per
leaf -> ``jax.jit(init, out_shardings=...)``. The mesh is a value passed to
these functions, never a global. See docs/sharding.md.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llm_mp.config import MESH_AXES, MeshConfig
from llm_mp.tasks import LM_BATCH_AXES

Rules = tuple[tuple[str, Any], ...]
BatchAxes = Mapping[str, tuple]  # batch key -> logical axes (a Task's batch_axes)

# flax semantics: for each array, rules are tried in order and a mesh axis is
# used at most once, so order matters. "batch" comes first: an activation
# ("batch", "length", "embed") then gets "fsdp" on its batch axis and leaves
# "embed" whole (FSDP gathers weights, not activations), while a parameter
# (no "batch" axis) gets "embed" -> "fsdp". "expert" comes before "mlp": a MoE
# weight ("expert", "embed", "mlp") is split by expert, its hidden units whole.
# As in MaxText, "kv" (head dim), "length" and the scan axis "layers" stay whole.
DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("expert", "tensor"),
  ("mlp", "tensor"),
  ("layers", None),
)

# The config field that sets the size of each logical parameter axis (for errors).
_AXIS_FIELDS: Mapping[str, str] = {
  "vocab": "model.vocab_size",
  "embed": "model.d_model",
  "heads": "model.n_heads",
  "kv_heads": "model.n_kv_heads",
  "kv": "model.head_dim",
  "mlp": "model.d_ff",
  "expert": "model.n_experts",
  "layers": "model.n_layers",
}


def logical_rules(cfg: MeshConfig) -> Rules:
  """The rules in effect: ``cfg.rules`` first (they win), then :data:`DEFAULT_RULES`."""
  return tuple(cfg.rules) + DEFAULT_RULES


def make_mesh(cfg: MeshConfig, devices: Any = None) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all, every process).

  One size may be -1: it takes the devices the others leave. Axes are
  ``Auto`` (GSPMD propagates shardings between the constraints we set).

  Raises:
    ValueError: the sizes do not multiply to the device count (the message
      names the sizes and the count).
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = {name: getattr(cfg, name) for name in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  described = ", ".join(f"{k}={v}" for k, v in sizes.items())
  if -1 in sizes.values():
    if len(devices) % known:
      raise ValueError(f"mesh {described}: {known} does not divide the {len(devices)} devices")
    sizes = {k: len(devices) // known if v == -1 else v for k, v in sizes.items()}
  elif known != len(devices):
    raise ValueError(f"mesh {described} has {known} devices, but there are {len(devices)}")
  return jax.make_mesh(
    tuple(sizes.values()), MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _axis_names(axes: Any) -> tuple[str, ...]:
  """A rule's mesh axes (a name, a tuple of names or None) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def check_divisible(boxed_params: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises ValueError unless every sharded parameter axis splits evenly.

  Args:
    boxed_params: params (or their ``jax.eval_shape``) with
      ``nn.LogicallyPartitioned`` boxes, as from ``state.init_variables_fn``.
    mesh, rules: where the names are mapped.

  The message names every offending config field, e.g. "mesh tensor=4 does
  not divide model.n_heads=6". We refuse rather than silently replicate: an
  uneven split would either pad (wasted memory and FLOPs) or change what the
  rules table promises.
  """
  bad = {}
  boxes = jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for box in boxes:
    if not isinstance(box, nn.LogicallyPartitioned):
      continue  # a leaf without logical names (replicated)
    names = box.get_partition_spec()
    for name, axes, dim in zip(names, nn.logical_to_mesh_axes(names, rules), box.value.shape):
      mesh_axes = _axis_names(axes)
      n = math.prod(mesh.shape[a] for a in mesh_axes)
      if dim % n:
        bad[_AXIS_FIELDS.get(name, f"axis {name!r}")] = ("*".join(mesh_axes), n, dim)
  if bad:
    raise ValueError(
      "; ".join(
        f"mesh {axes}={n} does not divide {field}={dim} (next multiple: {-(-dim // n) * n})"
        for field, (axes, n, dim) in bad.items()
      )
    )


def _dict_keys(path: tuple) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def follow_params(
  opt_shapes: Any, param_shapes: Any, param_shardings: Any, default: NamedSharding
) -> Any:
  """Shardings of optimizer-state leaves: a leaf whose dict-key path ends with a
  parameter's path and has its shape (a moment, a trace) takes that
  parameter's sharding; anything else (counts, masked-out groups) ``default``.

  Matching by path rather than by tree structure works for every optax
  combinator (``chain``, ``masked``, ``multi_transform``'s per-group states).
  """
  by_path = {
    _dict_keys(path): (leaf.shape, sharding)
    for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(param_shapes)[0], jax.tree.leaves(param_shardings)
    )
  }

  def pick(path, leaf):
    keys = _dict_keys(path)
    for i in range(len(keys)):
      shape, sharding = by_path.get(keys[i:], (None, None))
      if shape == leaf.shape:
        return sharding
    return default

  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
  """``fn`` tracing under ``mesh`` and ``rules``, so the model's
  ``nn.with_logical_constraint`` calls become sharding constraints.

  flax makes them no-ops unless both logical rules and a mesh are in context;
  an abstract mesh suffices and, unlike ``jax.set_mesh``, may be entered
  inside ``jax.jit``.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


def batch_sharding(
  mesh: Mesh, rules: Rules = DEFAULT_RULES, axes: tuple = ("batch", "length")
) -> NamedSharding:
  """Sharding of one batch array with logical ``axes`` (default ``[B, T]``:
  rows over the "batch" rule's mesh axes)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))


def batch_shardings(
  keys: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, batch_axes: BatchAxes = LM_BATCH_AXES
) -> dict[str, NamedSharding]:
  """``{key: NamedSharding}`` for the batch ``keys``, from the task's ``batch_axes``.

  Raises:
    ValueError: a key has no declared axes (the message lists the declared ones).
  """
  unknown = sorted(set(keys) - set(batch_axes))
  if unknown:
    raise ValueError(
      f"batch key(s) {unknown} have no declared sharding; the task declares {sorted(batch_axes)}"
    )
  return {k: batch_sharding(mesh, rules, tuple(batch_axes[k])) for k in keys}


class _JitPerBatchKeys:
  """A step jitted once per set of batch keys, each key with its declared sharding."""

  def __init__(
    self,
    fn: Callable,
    mesh: Mesh,
    rules: Rules,
    batch_axes: BatchAxes,
    first_sharding: Any,
    extra: tuple = (),
    **jit_kwargs,
  ):
    self._fn, self._mesh, self._rules, self._axes = fn, mesh, rules, batch_axes
    self._first, self._extra, self._kwargs = first_sharding, extra, jit_kwargs
    self.jitted: dict[frozenset, Callable] = {}

  def _get(self, batch: Mapping[str, Any]) -> Callable:
    keys = frozenset(batch)
    if keys not in self.jitted:
      in_shardings = (
        self._first,
        batch_shardings(keys, self._mesh, self._rules, self._axes),
        *(jax.tree.map(lambda x: x.sharding, a) for a in self._extra),
      )
      self.jitted[keys] = jax.jit(
        with_rules(self._fn, self._mesh, self._rules), in_shardings=in_shardings, **self._kwargs
      )
    return self.jitted[keys]

  def __call__(self, first: Any, batch: Mapping[str, Any]):
    return self._get(batch)(first, batch, *self._extra)

  def lower(self, first: Any, batch: Mapping[str, Any]):
    """``jax.jit(...).lower`` for these arguments (shapes suffice)."""
    return self._get(batch).lower(first, batch, *self._extra)


def jit_train_step(
  train_step: Callable,
  state_shardings: Any,
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
  batch_axes: BatchAxes = LM_BATCH_AXES,
  frozen: Mapping[str, Any] | None = None,
) -> Callable:
  """``train_step(state, batch) -> (state, metrics)`` jitted with explicit shardings.

  The state keeps ``state_shardings`` in and out and is donated (its buffers
  are reused for the new state; do not touch the old one after the call);
  each batch array is split as ``batch_axes`` (the task's) declares; metrics
  come back replicated. Pass the same ``rules`` as the state was built with
  (``logical_rules(config.mesh)``). The step is compiled once per set of
  batch keys (a training run has one); ``.lower(state, batch)`` lowers it.
  ``frozen`` (the task's read-only collections, ``TaskSpec.frozen``: arrays
  already placed) goes to ``train_step`` as a third argument with its arrays'
  shardings: an argument, not a closed-over constant, which jit would embed in
  the compiled program; it is not donated, so it stays bit for bit.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return _JitPerBatchKeys(
    train_step,
    mesh,
    rules,
    batch_axes,
    state_shardings,
    (dict(frozen),) if frozen else (),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def jit_eval_step(
  eval_step: Callable,
  state_shardings: Any,
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
  batch_axes: BatchAxes = LM_BATCH_AXES,
) -> Callable:
  """``eval_step(variables, batch) -> sums`` jitted like :func:`jit_train_step`,
  without donation; ``variables`` is ``state.variables``."""
  return _JitPerBatchKeys(
    eval_step,
    mesh,
    rules,
    batch_axes,
    state_shardings.variables,
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


def shard_batch(
  batch: Mapping[str, np.ndarray],
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
  batch_axes: BatchAxes = LM_BATCH_AXES,
) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch axes.

  Args:
    batch: NumPy arrays with this process's own rows on their leading axis
      (``[B_local, ...]``); they stay on its devices (no copy between hosts).
      With several processes each must own whole batch shards (``data *
      fsdp`` a multiple of the process count).
    mesh, rules: as for :func:`jit_train_step`.
    batch_axes: the task's logical axes of each key.

  Returns:
    ``[B_local * process_count, ...]`` global ``jax.Array``s: every process's
    rows, in the mesh's process order (the loss, a mean over rows, does not
    depend on that order).

  Raises:
    ValueError: the global batch does not split evenly over the batch axes,
      or a key has no declared axes.
  """
  shardings = batch_shardings(batch.keys(), mesh, rules, batch_axes)
  out = {}
  for key, local in batch.items():
    sharding = shardings[key]
    rows = math.prod(mesh.shape[a] for a in _axis_names(sharding.spec[0]))
    global_rows = local.shape[0] * jax.process_count()
    if global_rows % rows:
      raise ValueError(
        f"a batch of {global_rows} rows does not split over the mesh's "
        f"{rows} batch shards (data*fsdp); make train.batch_size a "
        f"multiple of {rows}"
      )
    out[key] = jax.make_array_from_process_local_data(sharding, local)
  return out


def state_memory_report(state: Any) -> dict[str, int]:
  """Bytes of params and optimizer state held by one device.

  Args:
    state: a TrainState of arrays or of ShapeDtypeStructs with shardings (so
      the fit of a layout can be checked before allocating it).

  Returns:
    ``{"params_bytes", "opt_state_bytes", "total_bytes", "unsharded_bytes"}``:
    what the first device of the mesh holds, and what one device would hold
    without sharding (``total_bytes / unsharded_bytes`` ~ ``1 / fsdp*tensor``).
  """
  leaves = jax.tree.leaves((state.params, state.opt_state))
  device = min(leaves[0].sharding.device_set, key=lambda d: d.id)

  def held(tree):
    return sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
      if device in x.sharding.device_set
    )

  params, opt_state = held(state.params), held(state.opt_state)
  return {
    "params_bytes": params,
    "opt_state_bytes": opt_state,
    "total_bytes": params + opt_state,
    "unsharded_bytes": sum(x.size * x.dtype.itemsize for x in leaves),
  }


# Environment variables that make :func:`maybe_initialize_distributed` start JAX's
# multi-process runtime (the first is also JAX's own name for the coordinator).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` when :data:`DISTRIBUTED_ENV` is set.

  ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's address, reachable by
  all), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0-based). Call it before
  anything touches a device. None set: single process, nothing happens.

  Returns:
    Whether it initialised the distributed runtime.

  Raises:
    ValueError: only some of the variables are set.
  """
  present = [k for k in DISTRIBUTED_ENV if os.environ.get(k)]
  if not present:
    return False
  if len(present) < len(DISTRIBUTED_ENV):
    missing = [k for k in DISTRIBUTED_ENV if k not in present]
    raise ValueError(f"multi-process run: {present} set but {missing} missing")
  address, count, index = (os.environ[k] for k in DISTRIBUTED_ENV)
  jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
  return True
