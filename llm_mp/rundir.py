"""A run directory: create, lock, check, write, publish atomically, and load.

A run directory holds ``config.json`` (the resolved config), ``corpus.json`` (the
data paths and the SHA-256 of the cleaned data), the tokenizer, orbax
checkpoints, ``metrics.jsonl`` and TensorBoard events. The trainer
(``llm_mp.train``) creates and locks one; ``import-hf``, ``quantize`` and
``lowrank`` publish one whole (:func:`publish_run`, :func:`write_run`); ``eval``,
``generate``, ``diagnose`` and prediction load one (:func:`load_run`) with its
parameters *and* its non-parameter collections (fp8 scales), so evaluating a
loaded run computes what the evaluation inside training computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from llm_mp import checkpoint, data, sharding
from llm_mp.builder import Recipe, build_recipe
from llm_mp.config import Config, MeshConfig
from llm_mp.precision import Precision
from llm_mp.state import abstract_train_state, create_sharded_state

# Fields that may change between runs on the same workdir (the run stays the same run).
RESUMABLE_FIELDS = {
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.eval_batches",
  "train.ckpt_every",
  "train.keep_checkpoints",
  "train.sample_prompt",
  "train.sample_tokens",
  # The corpus may move: data.paths are stored absolute, and CORPUS_FILE's hash of
  # the cleaned text is what must not change.
  "data.paths",
  # Checkpoints restore onto any mesh (orbax reshards); only reduction order changes.
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "mesh.rules",
  # Implementation choices: the same function, computed another way.
  "model.attention_impl",
  "model.remat",
}


LOCK_FILE = "train.lock"  # flock'ed by the trainer for its life; holds its pid
CORPUS_FILE = "corpus.json"  # the data paths and the SHA-256 of the cleaned corpus


class ConfigConflictError(ValueError):
  """The requested config differs from the one the workdir was created with."""


class WorkdirBusyError(ValueError):
  """Another trainer holds the workdir's lock."""


def check_workdir(workdir: str) -> None:
  """Raises ValueError (one line) for a workdir that cannot be a run directory:
  empty, an existing file, or one that is not writable. Writes nothing."""
  if not workdir:
    raise ValueError("--workdir is empty: name a run directory")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a directory")
  existing = workdir
  while not os.path.exists(existing):  # the nearest existing parent must be writable
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir} is not writable ({existing} is read-only or a file)")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive OS lock on ``workdir/train.lock`` for the ``with`` block.

  The lock is released on any exit, a crash or SIGKILL included (the kernel
  drops it with the file descriptor), so it is never stale. Readers (eval,
  generate) do not take it.

  Raises:
    WorkdirBusyError: another process holds it; the message names its pid.
  """
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
      raise WorkdirBusyError(
        f"workdir {workdir} is in use by another trainer (pid {holder}); "
        "wait for it to finish or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    yield
  finally:
    os.close(fd)


def with_absolute_paths(config: Config) -> Config:
  """``config`` with ``data.paths``, ``data.val_paths``, ``train.init_from`` and
  ``train.teacher`` made absolute, so a run resumes from any directory."""
  d, t = config.data, config.train
  absolute = lambda paths: tuple(os.path.abspath(p) for p in paths)
  run = lambda path: os.path.abspath(path) if path else path
  return dataclasses.replace(
    config,
    data=dataclasses.replace(d, paths=absolute(d.paths), val_paths=absolute(d.val_paths)),
    train=dataclasses.replace(t, init_from=run(t.init_from), teacher=run(t.teacher)),
  )


def with_schedule_steps(config: Config, old: Config | None) -> Config:
  """Fixes ``optim.schedule_steps`` (the lr schedule's length) when it is None:
  the workdir's value if it has one (an older workdir: its ``train.steps``),
  else ``train.steps`` of this new run."""
  if config.optim.schedule_steps is not None:
    return config
  if old is None:
    n = config.train.steps
  else:
    n = old.optim.schedule_steps or old.train.steps
  return dataclasses.replace(config, optim=dataclasses.replace(config.optim, schedule_steps=n))


def check_corpus(workdir: str, paths: tuple[str, ...], sha256: str, write: bool) -> None:
  """Raises ConfigConflictError if ``workdir`` was trained on another corpus text;
  else records ``paths`` and ``sha256`` in ``workdir/corpus.json`` (when ``write``)."""
  path = os.path.join(workdir, CORPUS_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        old = json.load(f)
      old_sha = old["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"{path} is unreadable ({e}); delete it to accept the current corpus"
      ) from None
    if old_sha != sha256:
      where = ", ".join(old.get("paths") or ["the embedded corpus"])
      raise ConfigConflictError(
        f"workdir {workdir} was trained on a corpus ({where}) with sha256 {old_sha[:12]}, "
        f"but the data now has sha256 {sha256[:12]}: its text changed; use a new --workdir "
        "or the original data"
      )
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"paths": list(paths), "sha256": sha256}, f, indent=2)
    os.replace(tmp, path)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def stored_config(workdir: str) -> Config | None:
  """The config a workdir was created with, or None for a new workdir.

  Raises:
    ValueError: config.json is unreadable, not JSON or not a valid config; the
      message starts with its path.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if not text.strip():
      raise ValueError("the file is empty")
    return Config.from_dict(json.loads(text))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
  except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: {e}") from None


def check_config(workdir: str, config: Config) -> None:
  """Raises ConfigConflictError if ``config`` conflicts with the workdir's."""
  old = stored_config(workdir)
  if old is None:
    return
  old, config = with_schedule_steps(old, old), with_schedule_steps(config, old)
  a, b = _flatten(old.to_dict()), _flatten(config.to_dict())
  diff = sorted(k for k in a if a[k] != b.get(k) and k not in RESUMABLE_FIELDS)
  if diff:
    k = diff[0]
    raise ConfigConflictError(
      f"workdir {workdir} was created with {k}={a[k]!r}, but {k}={b[k]!r} was requested "
      f"({len(diff)} conflicting field(s)); use a new --workdir or the same settings"
    )


def write_config(workdir: str, config: Config) -> None:
  """Writes ``workdir/config.json`` atomically."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json())
  os.replace(tmp, os.path.join(workdir, "config.json"))


def check_new_directory(path: str) -> None:
  """Raises ValueError unless ``path`` is absent or an empty directory: where a
  command will write a new run (checked before its work, and again when it writes)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{path}: already exists and is not empty")


def staging_directory(path: str) -> str:
  """A fresh sibling directory to write into before renaming it to ``path``."""
  check_new_directory(path)
  tmp = f"{os.path.abspath(path).rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def publish_directory(tmp: str, path: str) -> None:
  """Renames the finished ``tmp`` (from :func:`staging_directory`) to ``path``."""
  if os.path.isdir(path):
    os.rmdir(path)  # empty, checked by staging_directory
  os.replace(tmp, path)


def write_run(workdir: str, config: Config, params: Any, tokenizer: Any) -> None:
  """Writes an llm_mp run directory: ``config.json``, the tokenizer and a step-0
  checkpoint of ``params`` (with a fresh optimizer state), so ``generate``,
  ``eval`` and ``train train.init_from=workdir`` work on it.

  Raises:
    ValueError: ``workdir`` exists and is not empty, or ``params`` do not match
      the parameters ``config`` builds (path and shapes named); nothing is
      written then.
  """
  recipe = build_recipe(config, tokenizer)
  mesh = sharding.make_mesh(config.mesh)
  rng = jax.random.key(config.train.seed)
  abstract = abstract_train_state(recipe.model, recipe.tx, config, mesh, rng)
  want = traverse_util.flatten_dict(abstract.params, sep="/")
  got = traverse_util.flatten_dict(params, sep="/")
  for path in sorted(set(want) | set(got)):
    if path not in got or path not in want:
      raise ValueError(
        f"params: {path} is {'missing' if path not in got else 'unexpected'} for this config"
      )
    if tuple(np.shape(got[path])) != tuple(want[path].shape):
      raise ValueError(
        f"params: {path} has shape {list(np.shape(got[path]))}, the config "
        f"builds {list(want[path].shape)}"
      )
  new = traverse_util.unflatten_dict(
    {p: jax.device_put(np.asarray(got[p]).astype(want[p].dtype), want[p].sharding) for p in want},
    sep="/",
  )
  new = jax.tree.map(lambda _, x: x, abstract.params, new)  # the config's tree structure
  state, _ = create_sharded_state(
    recipe.model, recipe.tx, config, mesh, rng, params=new, abstract=abstract
  )
  publish_run(workdir, config, tokenizer, 0, state)


def publish_run(
  workdir: str,
  config: Config,
  tokenizer: Any,
  step: int,
  tree: Any,
  fill: Callable[[str], None] | None = None,
) -> None:
  """Writes a run directory atomically: ``config.json``, the tokenizer, a checkpoint of
  ``tree`` (a TrainState, or ``{"params": ...}`` for a params-only run) at ``step``,
  and whatever ``fill(directory)`` adds; built in a staging directory and renamed
  into place, so a failure leaves nothing behind.

  Raises:
    ValueError: ``workdir`` exists and is not empty.
  """
  tmp = staging_directory(workdir)
  try:
    write_config(tmp, config)
    tokenizer.save(tmp)
    if fill is not None:
      fill(tmp)
    manager = checkpoint.make_manager(os.path.join(tmp, "checkpoints"), 1)
    checkpoint.save(manager, step, tree, {}, force=True)
    checkpoint.wait(manager)
    manager.close()
    publish_directory(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def abstract_run_state(config: Config, mesh: Any, tokenizer: Any = None) -> Any:
  """The TrainState ``config``'s run has, as ``jax.ShapeDtypeStruct`` leaves with
  their shardings on ``mesh`` (no FLOPs, no device memory)."""
  recipe = build_recipe(config, tokenizer)
  return abstract_train_state(
    recipe.model, recipe.tx, config, mesh, jax.random.key(config.train.seed)
  )


def restore_run_variables(
  workdir: str, config: Config, mesh: Any, tokenizer: Any = None
) -> tuple[Any, dict[str, Any], int]:
  """The parameters and non-parameter collections (fp8 scales) of run ``workdir``
  (whose config is ``config``), read from its newest checkpoint onto ``mesh``
  without the optimizer state.

  Returns:
    ``(params, model_state, step)``.

  Raises:
    CheckpointError: the run has no readable checkpoint.
    ValueError: a config the builder rejects.
  """
  abstract = abstract_run_state(config, mesh, tokenizer)
  return checkpoint.restore_variables(
    os.path.join(workdir, "checkpoints"), abstract.params, abstract.model_state
  )


@dataclasses.dataclass
class LoadedRun:
  """A trained run, restored for evaluation, generation and prediction.

  Attributes:
    workdir: its directory (read only: nothing is written into it).
    config, recipe: its config and the static pieces built from it (policy,
      task, model).
    params, model_state: the latest checkpoint's parameters and non-parameter
      collections (``{}`` for most models; fp8 scales and amax histories).
    tokenizer: the run's tokenizer.
    mesh, rules, shardings: where the parameters live.
    step: the checkpoint's step.
  """

  workdir: str
  config: Config
  recipe: Recipe
  params: Any
  model_state: dict[str, Any]
  tokenizer: data.Tokenizer
  mesh: Any
  rules: Any
  shardings: Any
  step: int

  @property
  def precision(self) -> Precision:
    return self.recipe.precision

  @property
  def model(self):
    return self.recipe.model

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params": ..., **model_state}``: what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


def load_run(workdir: str, mesh_config: MeshConfig | None = None) -> LoadedRun:
  """Restores the latest checkpoint of ``workdir`` (parameters and collections).

  ``mesh_config``: lay the run out on this mesh with these rules instead of its
  own (a distillation teacher placed like its student).

  Raises:
    ValueError: ``workdir`` is not a run directory or has no checkpoint yet.
  """
  config = stored_config(workdir)
  if config is None:
    if not os.path.isdir(workdir):
      raise ValueError(f"run {workdir} does not exist")
    raise ValueError(f"{workdir} has no config.json: not a run directory (train first)")
  if mesh_config is not None:
    config = dataclasses.replace(config, mesh=mesh_config)
  tokenizer = data.load_tokenizer(workdir)
  mesh = sharding.make_mesh(config.mesh)
  recipe = build_recipe(config, tokenizer)
  params, model_state, step = restore_run_variables(workdir, config, mesh, tokenizer)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  rules = sharding.logical_rules(config.mesh)
  return LoadedRun(
    workdir, config, recipe, params, model_state, tokenizer, mesh, rules, shardings, step
  )
