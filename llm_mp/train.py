"""The training loop, as a short composition a researcher can read and copy.

config -> mesh -> data -> state (created sharded, or restored) -> jitted step
-> metrics, evaluation and checkpoints. Running :func:`train` again on the
same workdir resumes from the latest checkpoint: the train state, the data
iterator position and the RNG are all in it, so the resumed run computes the
same losses as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import time
from typing import Any, Iterator

import jax

from llm_mp import checkpoint, data, sharding
from llm_mp.builder import (
  Recipe,
  build_recipe,
  check_init_from,
  load_backbone,
  restore_run_params,
  run_precision,
)
from llm_mp.config import Config
from llm_mp.data import text2text
from llm_mp.generate import generate_text
from llm_mp.int_formats import WEIGHT_ONLY
from llm_mp.metrics import (
  MetricsWriter,
  bar_postfix,
  flops_per_token,
  params_without_positions,
  progress_bar,
  to_python,
  truncate_metrics,
)
from llm_mp.precision import loss_scale_kind
from llm_mp.state import bytes_per_param, param_count
from llm_mp.step import make_eval_step, make_train_step
from llm_mp.tasks import LM_BATCH_AXES, Task, task_name

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
  """``config`` with ``data.paths``, ``data.val_paths`` and ``train.init_from``
  made absolute, so a run resumes from any directory."""
  d, t = config.data, config.train
  absolute = lambda paths: tuple(os.path.abspath(p) for p in paths)
  init_from = os.path.abspath(t.init_from) if t.init_from else t.init_from
  return dataclasses.replace(
    config,
    data=dataclasses.replace(d, paths=absolute(d.paths), val_paths=absolute(d.val_paths)),
    train=dataclasses.replace(t, init_from=init_from),
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


@dataclasses.dataclass
class Run:
  """Everything built from a config that is not training state."""

  config: Config
  recipe: Recipe
  mesh: Any
  rules: Any
  state: Any
  shardings: Any
  data_state: Any
  step: int

  @property
  def model(self):
    return self.recipe.model


def build(config: Config, ckpt, say=print, tokenizer: Any = None) -> Run:
  """Mesh, recipe (model, task, optimizer) and state: restored from the
  checkpoint manager ``ckpt`` if it has a checkpoint (onto this config's
  mesh, whatever mesh saved it), else created directly sharded, with the
  backbone of ``train.init_from`` when set."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  recipe = build_recipe(config, tokenizer)
  rng = jax.random.key(config.train.seed)
  abstract = sharding.abstract_train_state(recipe.model, recipe.tx, config, mesh, rng)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  say(
    f"model: {config.model.family}, task {recipe.task.name}, "
    f"{param_count(abstract.params):,} parameters, attention "
    f"{recipe.config.model.attention_impl} ({jax.default_backend()}); loss scale "
    f"{loss_scale_kind(config.precision.policy, config.precision.loss_scale)}; "
    f"{recipe.precision.describe()}"
  )
  mem = sharding.state_memory_report(abstract)
  say(
    f"mesh: {dict(mesh.shape)}; per device: params {mem['params_bytes'] / 2**20:.1f} MiB, "
    f"optimizer state {mem['opt_state_bytes'] / 2**20:.1f} MiB; "
    f"{bytes_per_param(abstract):.2f} bytes per parameter (params + optimizer state)"
  )
  restored = checkpoint.restore_latest(ckpt, abstract)
  if restored is None:
    state, _ = sharding.create_sharded_state(recipe.model, recipe.tx, config, mesh, rng)
    source = config.train.init_from
    if source:
      source_config = stored_config(source)
      if source_config is None:
        raise ValueError(f"train.init_from={source} has no config.json: not a run directory")
      check_init_from(config, source_config, source)
      params, step = restore_run_params(source, source_config, mesh, tokenizer)
      state = state.replace(params=load_backbone(state.params, params, source))
      say(f"backbone from {source} (step {step}); fresh heads")
    return Run(config, recipe, mesh, rules, state, shardings, None, 0)
  state, data_state, step = restored
  say(f"resumed from step {step}")
  return Run(config, recipe, mesh, rules, state, shardings, data_state, step)


def evaluate(
  eval_fn, variables: Any, batches: Iterator[dict], mesh, rules, task: Task | None = None
) -> dict[str, float]:
  """Exact means of the task loss and metrics of ``variables`` over ``batches``.

  Returns ``val_loss``, ``val_<unit>`` (tokens or examples counted),
  ``val_ppl`` for token-level tasks and ``val_<metric>`` for task metrics
  (``val_accuracy``).
  """
  axes = task.batch_axes if task else LM_BATCH_AXES
  unit = task.unit if task else "tokens"
  sums: dict[str, float] = {}
  for batch in batches:
    out = eval_fn(variables, sharding.shard_batch(batch, mesh, rules, axes))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  n = max(sums.get(unit, 0.0), 1.0)
  loss = sums.get("loss_sum", 0.0) / n
  result = {"val_loss": loss, f"val_{unit}": sums.get(unit, 0.0)}
  if task is None or task.perplexity:
    result["val_ppl"] = math.exp(min(loss, 50.0))
  for k, v in sums.items():
    if k.endswith("_sum") and k != "loss_sum":
      result[f"val_{k[:-4]}"] = v / n
  return result


def validate(config: Config) -> None:
  """Checks what only devices and the policy parser can check, before anything
  is written: the precision spec (no weight-only format: those hold integers that
  take no gradient), the mesh, and that the batch splits over it."""
  frozen = sorted({fmt for _, fmt in run_precision(config).formats} & set(WEIGHT_ONLY))
  if frozen:
    raise ValueError(
      f"precision.formats={config.precision.formats!r}: {frozen[0]} stores integer weights "
      "for eval and generate (written by llm-mp quantize); train with precision.formats=int8"
    )
  mesh = sharding.make_mesh(config.mesh)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % rows:
    raise ValueError(
      f"train.batch_size={config.train.batch_size} does not split over the "
      f"mesh's {rows} batch shards (data*fsdp)"
    )


def prepare_task_data(config: Config, workdir: str):
  """The task's data: ``(prepared, make_train_iter, make_eval_iter)``.

  Token-level tasks (lm, mlm) read the corpus as packed rows; ``classify``
  reads labelled examples (``llm_mp.data.labelled``). A fine-tuning run
  (``train.init_from``) uses its source run's tokenizer. The iterator
  factories take no arguments: batch size, seed and eval length come from
  ``config.train``.
  """
  t = config.train
  tokenizer = data.load_tokenizer(t.init_from) if t.init_from else None
  if task_name(config) == "classify":
    prepared = data.prepare_labelled(
      config.data, workdir, tokenizer, n_classes=config.model.n_classes
    )
    if len(prepared.label_names) > config.model.n_classes:
      raise ValueError(
        f"model.n_classes={config.model.n_classes} is smaller than the "
        f"{len(prepared.label_names)} classes of the data "
        f"{list(prepared.label_names)}"
      )
    return (
      prepared,
      lambda: data.shuffled_batches(prepared.train, t.batch_size, t.seed),
      lambda: data.ordered_batches(prepared.val, t.batch_size, t.eval_batches),
    )
  if task_name(config) == "seq2seq":
    prepared = text2text.prepare_text2text(config.data, workdir, tokenizer)
    return (
      prepared,
      lambda: data.shuffled_batches(prepared.train, t.batch_size, t.seed),
      lambda: data.ordered_batches(prepared.val, t.batch_size, t.eval_batches),
    )
  prepared = data.prepare_data(config.data, workdir, tokenizer)
  return (
    prepared,
    lambda: data.make_train_iterator(prepared, t.batch_size, t.seed),
    lambda: data.make_eval_iterator(prepared, t.batch_size, t.eval_batches),
  )


@contextlib.contextmanager
def _stop_on_signal():
  """Turns the first SIGINT/SIGTERM into a flag, so the loop saves and exits."""
  flag = {"stop": None}
  handlers = {}

  def handle(signum, _frame):
    flag["stop"] = signal.Signals(signum).name

  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      handlers[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
      pass
  try:
    yield flag
  finally:
    for sig, old in handlers.items():
      signal.signal(sig, old)


def check_data(config: Config, prepared: data.PreparedData | data.PreparedLabelled) -> bool:
  """Checks before step 1 what would otherwise fail later: the tokenizer fits
  the model, the training split packs into rows, and evaluation has rows.

  Returns whether evaluation is on (``data.val_fraction > 0``; labelled data
  always has validation rows, ``prepare_labelled`` checks that).

  Raises:
    ValueError: naming the field (and the split) at fault.
  """
  if config.model.vocab_size < prepared.tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={config.model.vocab_size} is smaller than the "
      f"tokenizer's vocabulary ({prepared.tokenizer.vocab_size})"
    )
  if isinstance(prepared, (data.PreparedLabelled, text2text.PreparedText2Text)):
    return True
  seq_len, pad = config.data.seq_len, prepared.tokenizer.pad_id
  data.PackedRows(prepared.train, seq_len, pad)  # raises on an empty training split
  if config.data.val_fraction == 0:
    return False
  if prepared.val.num_tokens < 2:
    raise ValueError(
      f"data.val_fraction={config.data.val_fraction} leaves no validation text "
      f"({prepared.summary.documents} document(s)); add data, or set "
      "data.val_fraction=0 to train without evaluation"
    )
  return True


def _sample(config: Config, model: Any, variables: Any, tokenizer: Any) -> str | None:
  """Text of up to ``train.sample_tokens`` tokens after ``train.sample_prompt``
  (temperature 0.8, seed ``train.seed``, clipped to the context), or None when
  ``sample_tokens == 0`` or the prompt fills the context. ``variables``: the
  state's (the params and any fp8 scales)."""
  t = config.train
  if config.model.family != "decoder":  # only decoders continue a prompt
    return None
  room = config.model.max_len - len(tokenizer.encode(t.sample_prompt)) - 1  # -1: bos
  n = min(t.sample_tokens, room)
  if n < 1:
    return None
  return generate_text(
    config.model,
    model.precision,
    variables,
    tokenizer,
    t.sample_prompt,
    max_new_tokens=n,
    seed=t.seed,
    temperature=0.8,
  )


def train(
  config: Config, workdir: str, verbose: bool = True, until: int | None = None
) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns the last logged metrics.

  Writes ``config.json``, ``corpus.json``, the tokenizer, ``metrics.jsonl``,
  TensorBoard events and checkpoints under ``workdir``, holding its lock
  (:func:`workdir_lock`) throughout. Everything that can be checked before
  step 1 is (config, workdir, data, vocabulary); nothing is written before the
  config validates. On SIGINT/SIGTERM it saves a checkpoint and returns with
  ``{"interrupted": signal name}``. ``until`` stops (with a checkpoint) after
  that step, as a preempted job would; the schedule still runs to
  ``optim.schedule_steps``.
  """
  sharding.maybe_initialize_distributed()
  check_workdir(workdir)
  config = with_schedule_steps(with_absolute_paths(config), stored_config(workdir))
  check_config(workdir, config)
  validate(config)
  is_main = jax.process_index() == 0
  lock = workdir_lock(workdir) if is_main else contextlib.nullcontext()
  with lock:
    return _train_locked(config, workdir, verbose, until, is_main)


def _train_locked(
  config: Config, workdir: str, verbose: bool, until: int | None, is_main: bool
) -> dict[str, Any]:
  say = print if verbose and is_main else (lambda *a, **k: None)
  prepared, make_train_iter, make_eval_iter = prepare_task_data(config, workdir)
  say(prepared)
  eval_on = check_data(config, prepared)
  check_corpus(workdir, config.data.paths, prepared.sha256, write=is_main)
  t = config.train
  ckpt = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)
  run = build(config, ckpt, say, prepared.tokenizer)
  state = run.state
  start = int(state.step)
  if start >= t.steps:
    say(f"{workdir} already trained to step {start} (train.steps={t.steps}); nothing to do")
    return {}
  if is_main:
    write_config(workdir, config)
    truncate_metrics(workdir, start)  # a resumed run repeats the steps after its checkpoint
  train_iter = make_train_iter()
  if run.data_state is not None:
    train_iter.set_state(run.data_state)
  r = run.recipe
  step_fn = sharding.jit_train_step(
    make_train_step(r.model, r.tx, r.schedule, config, r.task),
    run.shardings,
    run.mesh,
    run.rules,
    r.task.batch_axes,
  )
  eval_fn = sharding.jit_eval_step(
    make_eval_step(r.model, r.task), run.shardings, run.mesh, run.rules, r.task.batch_axes
  )
  tokens_per_step = t.batch_size * config.data.seq_len
  flops = flops_per_token(
    config.model, config.data.seq_len, params_without_positions(run.state.params)
  )
  state_bytes = bytes_per_param(run.state)
  writer = MetricsWriter(workdir, enabled=is_main, purge_step=start + 1)
  last: dict[str, Any] = {}
  bar = progress_bar(t.steps, start, enabled=is_main and verbose)
  t0, step0 = time.perf_counter(), start
  with _stop_on_signal() as stop:
    for step in range(start + 1, min(t.steps, until or t.steps) + 1):
      batch = sharding.shard_batch(next(train_iter), run.mesh, run.rules, r.task.batch_axes)
      state, metrics = step_fn(state, batch)
      bar.update(1)
      is_log = step % t.log_every == 0 or step == t.steps
      is_eval = eval_on and (step % t.eval_every == 0 or step == t.steps)
      if is_log or is_eval:
        last = to_python(metrics)  # the only host sync: once per log or eval interval
        dt = time.perf_counter() - t0
        last["tokens_per_s"] = (step - step0) * tokens_per_step / dt
        last["flops_per_s"] = last["tokens_per_s"] * flops
        last["bytes_per_param"] = state_bytes  # params + optimizer state
        if is_eval:
          batches = make_eval_iter()
          last.update(evaluate(eval_fn, state.variables, batches, run.mesh, run.rules, r.task))
          sample = _sample(config, run.model, state.variables, prepared.tokenizer)
          if sample is not None:
            last["sample"] = sample
            if is_main and verbose:
              bar.write(f"step {step} sample: {t.sample_prompt}{sample}")
        writer.write(step, last)
        bar.set_postfix_str(bar_postfix(last))
        t0, step0 = time.perf_counter(), step  # evaluation time does not count as training
      if step % t.ckpt_every == 0 or step in (t.steps, until) or stop["stop"]:
        checkpoint.save(ckpt, step, state, train_iter.get_state(), force=True)
      if stop["stop"]:
        last["interrupted"] = stop["stop"]
        break
  bar.close()
  checkpoint.wait(ckpt)
  writer.close()
  if is_main and verbose and "interrupted" in last:
    print(
      f"{last['interrupted']}: checkpoint saved at step {int(state.step)}; "
      "run the same command to resume"
    )
  return last
