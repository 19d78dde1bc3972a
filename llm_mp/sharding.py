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
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llm_mp.config import MESH_AXES, Config, MeshConfig
from llm_mp.precision import Precision
from llm_mp.state import TrainState, init_params_fn, make_init_fn

Rules = tuple[tuple[str, Any], ...]

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
    "vocab": "model.vocab_size", "embed": "model.d_model", "heads": "model.n_heads",
    "kv_heads": "model.n_kv_heads", "kv": "model.head_dim", "mlp": "model.d_ff",
    "expert": "model.n_experts", "layers": "model.n_layers",
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
      raise ValueError(f"mesh {described}: {known} does not divide the "
                       f"{len(devices)} devices")
    sizes = {k: len(devices) // known if v == -1 else v for k, v in sizes.items()}
  elif known != len(devices):
    raise ValueError(f"mesh {described} has {known} devices, but there are {len(devices)}")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, (AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _axis_names(axes: Any) -> tuple[str, ...]:
  """A rule's mesh axes (a name, a tuple of names or None) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def check_divisible(boxed_params: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises ValueError unless every sharded parameter axis splits evenly.

  Args:
    boxed_params: params (or their ``jax.eval_shape``) with
      ``nn.LogicallyPartitioned`` boxes, as from ``state.init_params_fn``.
    mesh, rules: where the names are mapped.

  The message names every offending config field, e.g. "mesh tensor=4 does
  not divide model.n_heads=6". We refuse rather than silently replicate: an
  uneven split would either pad (wasted memory and FLOPs) or change what the
  rules table promises.
  """
  bad = {}
  boxes = jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for box in boxes:
    names = box.get_partition_spec()
    for name, axes, dim in zip(names, nn.logical_to_mesh_axes(names, rules), box.value.shape):
      mesh_axes = _axis_names(axes)
      n = math.prod(mesh.shape[a] for a in mesh_axes)
      if dim % n:
        bad[_AXIS_FIELDS.get(name, f"axis {name!r}")] = ("*".join(mesh_axes), n, dim)
  if bad:
    raise ValueError("; ".join(
        f"mesh {axes}={n} does not divide {field}={dim} (next multiple: {-(-dim // n) * n})"
        for field, (axes, n, dim) in bad.items()))


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         precision: Precision, config: Config, mesh: Mesh,
                         rng: jax.Array) -> TrainState:
  """The TrainState as ``jax.ShapeDtypeStruct`` leaves carrying their target shardings.

  No FLOPs and no device memory: the target for :func:`create_sharded_state`
  and for ``checkpoint.restore_latest``. Parameters follow the rules (validated
  with :func:`check_divisible`); optimizer-state leaves that mirror a parameter
  (moments, traces) take that parameter's sharding; everything else (counts,
  step, loss scale, rng) is replicated.
  """
  rules = logical_rules(config.mesh)
  boxed = jax.eval_shape(init_params_fn(model, config.data.seq_len), rng)
  check_divisible(boxed, mesh, rules)
  param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  shapes = jax.eval_shape(make_init_fn(model, tx, precision, config), rng)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, shapes).replace(
      params=param_shardings,
      opt_state=optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_shardings,
                                      transform_non_params=lambda _: replicated))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


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


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                         precision: Precision, config: Config, mesh: Mesh,
                         rng: jax.Array) -> tuple[TrainState, TrainState]:
  """Initialises the TrainState directly in its sharded layout.

  Args:
    model, tx, precision, config: as for ``state.make_init_fn``.
    mesh: from :func:`make_mesh`.
    rng: PRNG key (the same on every process).

  Returns:
    ``(state, shardings)``: the state, each leaf a global ``jax.Array`` laid
    out as :func:`abstract_train_state` says (no device ever holds it whole),
    and the matching tree of ``NamedSharding`` for :func:`jit_train_step`.

  Raises:
    ValueError: a sharded axis is not divisible by its mesh axes.
  """
  abstract = abstract_train_state(model, tx, precision, config, mesh, rng)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  init = with_rules(make_init_fn(model, tx, precision, config), mesh, logical_rules(config.mesh))
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a ``[B, T]`` batch array: rows over the "batch" rule's axes."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> Callable:
  """``train_step(state, batch) -> (state, metrics)`` jitted with explicit shardings.

  The state keeps ``state_shardings`` in and out and is donated (its buffers
  are reused for the new state; do not touch the old one after the call); the
  batch is split over the batch axes; metrics come back replicated. Pass the
  same ``rules`` as the state was built with (``logical_rules(config.mesh)``).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(with_rules(train_step, mesh, rules),
                 in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_step: Callable, state_shardings: TrainState, mesh: Mesh,
                  rules: Rules = DEFAULT_RULES) -> Callable:
  """``eval_step(params, batch) -> metrics`` jitted like :func:`jit_train_step`,
  without donation (the params are used again)."""
  return jax.jit(with_rules(eval_step, mesh, rules),
                 in_shardings=(state_shardings.params, batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch axes.

  Args:
    batch: ``[B_local, T]`` NumPy arrays, this process's own rows; they stay
      on its devices (no copy between hosts). With several processes each
      must own whole batch shards (``data * fsdp`` a multiple of the process count).
    mesh, rules: as for :func:`jit_train_step`.

  Returns:
    ``[B_local * process_count, T]`` global ``jax.Array``s: every process's
    rows, in the mesh's process order (the loss, a mean over rows, does not
    depend on that order).

  Raises:
    ValueError: the global batch does not split evenly over the batch axes.
  """
  sharding = batch_sharding(mesh, rules)
  rows = math.prod(mesh.shape[a] for a in _axis_names(sharding.spec[0]))
  out = {}
  for key, local in batch.items():
    global_rows = local.shape[0] * jax.process_count()
    if global_rows % rows:
      raise ValueError(f"a batch of {global_rows} rows does not split over the mesh's "
                       f"{rows} batch shards (data*fsdp); make train.batch_size a "
                       f"multiple of {rows}")
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
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree) if device in x.sharding.device_set)

  params, opt_state = held(state.params), held(state.opt_state)
  return {"params_bytes": params, "opt_state_bytes": opt_state,
          "total_bytes": params + opt_state,
          "unsharded_bytes": sum(x.size * x.dtype.itemsize for x in leaves)}


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
