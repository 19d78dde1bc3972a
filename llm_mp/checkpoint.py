"""Checkpoints: the whole TrainState and the data-iterator state, with orbax.

Layout: ``<directory>/<step>/state`` (the TrainState as an orbax PyTree of
global arrays, each process writing its own shards) and
``<directory>/<step>/meta`` (JSON: the data-iterator state and a fingerprint
of the TrainState's bits). The run's config is ``workdir/config.json``,
written by the trainer.

Saves are asynchronous (orbax's default): :func:`save` returns once the arrays
are copied off the devices, so the next (donating) train step may run at once;
files are written in a background thread; :func:`wait` blocks until they are
on disk. Saves are atomic: orbax writes into ``<step>.orbax-checkpoint-tmp``,
adds ``commit_success.txt`` and renames the directory to ``<step>`` (one
``rename(2)`` on a local filesystem), so a crash leaves a tmp directory that
is never mistaken for a checkpoint.

:func:`restore_latest` restores into an abstract target whose leaves carry the
*target* shardings, so a checkpoint saved on one mesh restores onto any other
mesh or device count. An unreadable latest checkpoint (missing or truncated
files, garbage, bits that no longer match the fingerprint) gives a warning
naming the step and the reason, and the previous checkpoint is tried.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM, META_ITEM = "state", "meta"
# orbax's suffix for a save in progress (renamed to "<step>" when complete).
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
  """No checkpoint in a non-empty directory could be restored."""


def make_manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
  """An orbax manager saving asynchronously under ``directory``, keeping the last ``keep``.

  Create it on every process of a multi-process run (orbax coordinates them).
  """
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(n=keep), create=True
  )
  return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element; keys: their key data)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(tree: Any) -> jax.Array:
  # A wrapping uint32 sum of the bits: exact and independent of the sharding
  # (integer addition is associative), and any single changed word changes it.
  return sum((jnp.sum(_words(x), dtype=jnp.uint32) for x in jax.tree.leaves(tree)), jnp.uint32(0))


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict[str, Any],
  force: bool = False,
) -> bool:
  """Starts saving ``state`` and ``data_state`` as checkpoint ``step``.

  Args:
    manager: from :func:`make_manager`.
    step: the checkpoint's number (the TrainState's step).
    state: the TrainState (global arrays; every process calls this).
    data_state: JSON-able data-iterator state (process 0's is written).
    force: save even if the manager's policy would skip this step. The
      trainer's SIGINT/SIGTERM path calls ``save(..., force=True)`` then
      :func:`wait` before exiting.

  Returns:
    Whether a save was started. A checkpoint already at ``step`` (one that
    :func:`restore_latest` found unreadable and skipped) is replaced.
  """
  if step in manager.all_steps():
    manager.delete(step)
  meta = {"data_state": data_state, "fingerprint": int(_fingerprint(state))}
  return manager.save(
    step,
    force=force,
    args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
    ),
  )


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until every started save is on disk (and raises its error, if any)."""
  manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, Any]:
  out = manager.restore(
    step,
    args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract), META_ITEM: ocp.args.JsonRestore()}
    ),
  )
  state, meta = out[STATE_ITEM], out[META_ITEM]
  found = int(_fingerprint(state))
  if found != meta["fingerprint"]:
    raise CheckpointError(
      f"the restored arrays' fingerprint {found} differs from the "
      f"saved {meta['fingerprint']}: some array file is corrupt"
    )
  return state, meta["data_state"]


def _warn_unfinished(directory: epath.Path) -> None:
  for path in directory.iterdir():
    if TMP_SUFFIX in path.name:
      warnings.warn(
        f"checkpoint step {path.name.split('.')[0]} in {directory} was never "
        f"finished ({path.name} left by a crash or kill while saving); ignored",
        stacklevel=4,
      )


def restore_latest(
  manager_or_dir: ocp.CheckpointManager | str, target: Any
) -> tuple[Any, Any, int] | None:
  """Restores the newest readable checkpoint into ``target``'s shapes and shardings.

  Args:
    manager_or_dir: a manager from :func:`make_manager`, or a checkpoint
      directory (then opened read-only, e.g. by an evaluator beside a trainer).
    target: a TrainState of ``jax.ShapeDtypeStruct`` with shardings (e.g.
      ``sharding.abstract_train_state``) or of arrays (only their shape, dtype
      and sharding are used). Its shardings may differ from those at save
      time: another mesh shape or device count.

  Returns:
    ``(state, data_state, step)``, or None if there is no checkpoint at all.

  Raises:
    CheckpointError: checkpoints exist but none is readable; the message
      gives each step's reason (e.g. a target whose shapes do not match).
  """
  if isinstance(manager_or_dir, ocp.CheckpointManager):
    return _restore_newest(manager_or_dir, target)
  if not epath.Path(manager_or_dir).exists():
    return None
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(epath.Path(manager_or_dir).absolute(), options=options) as manager:
    return _restore_newest(manager, target)


def _newest_readable(manager: ocp.CheckpointManager, restore: Any, what_to_do: str) -> Any:
  """``(restore(step), step)`` for the newest step ``restore`` can read, falling
  back step by step (a warning each time), or None without checkpoints.

  Raises:
    CheckpointError: none is readable; the message gives each step's reason
      and ``what_to_do``.
  """
  _warn_unfinished(manager.directory)
  failures = []
  steps = sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      return restore(step), step
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
      failures.append(f"step {step}: {reason}")
      if i + 1 < len(steps):  # the last failure is reported by the error below
        warnings.warn(
          f"checkpoint step {step} in {manager.directory} is unreadable ({reason}); "
          f"falling back to step {steps[i + 1]}",
          stacklevel=4,
        )
  if failures:
    raise CheckpointError(
      f"no readable checkpoint in {manager.directory} ({'; '.join(failures)}); if the run's "
      f"config or code changed, use the matching version; otherwise {what_to_do}"
    )
  return None


def _restore_newest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, Any, int] | None:
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
  )
  found = _newest_readable(
    manager,
    lambda step: _restore(manager, step, abstract),
    "move that directory away to restart from step 0",
  )
  if found is None:
    return None
  (state, data_state), step = found
  return state, data_state, step


def _restore_variables_at(
  manager: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_model_state: Any
) -> tuple[Any, Any]:
  item = {"params": abstract_params}
  if abstract_model_state:  # params-only checkpoints (quantised runs) have no collections
    item["model_state"] = abstract_model_state
  out = manager.restore(
    step,
    args=ocp.args.Composite(
      **{
        STATE_ITEM: ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      }
    ),
  )
  return out[STATE_ITEM]["params"], out[STATE_ITEM].get("model_state", {})


def restore_variables(
  directory: str, abstract_params: Any, abstract_model_state: Any = None
) -> tuple[Any, Any, int]:
  """Reads the parameters and non-parameter collections (``TrainState.model_state``:
  fp8 scales) of the newest readable checkpoint in ``directory``.

  For evaluation, generation and fine-tuning: the optimizer state (twice the
  parameters' size for Adam) is neither read nor allocated, and the directory
  is opened read-only. The bit fingerprint covers the whole state, so it is
  not checked here; a checkpoint orbax cannot read falls back to the previous
  one, as in :func:`restore_latest`.

  Args:
    directory: a run's ``checkpoints/`` directory.
    abstract_params: the params tree of ``jax.ShapeDtypeStruct`` with the
      target shardings.

  Returns:
    ``(params, step)``.

  Raises:
    CheckpointError: there is no checkpoint, or none is readable.
  """
  path = epath.Path(directory).absolute()
  if not path.exists():
    raise CheckpointError(f"{directory} has no checkpoint yet: train first")
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(path, options=options) as manager:
    found = _newest_readable(
      manager,
      lambda step: _restore_variables_at(manager, step, abstract_params, abstract_model_state),
      "the run has no usable parameters: train it again",
    )
  if found is not None:
    (params, model_state), step = found
    return params, model_state, step
  raise CheckpointError(f"{directory} has no checkpoint yet: train first")
