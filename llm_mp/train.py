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
import os
import shutil
import signal
import time
from typing import Any

import jax

from llm_mp import checkpoint, data, sharding
from llm_mp.builder import (
  Recipe,
  build_recipe,
  check_init_from,
  check_patterns,
  frozen_count,
  kept_heads,
  load_backbone,
  module_paths,
  run_precision,
)
from llm_mp.config import Config
from llm_mp.formats import weight_only_formats
from llm_mp.generate import encode_prompt, generate_text
from llm_mp.inference import evaluate
from llm_mp.metrics import (
  MetricsWriter,
  bar_postfix,
  flops_per_token,
  params_without_positions,
  progress_bar,
  to_python,
  truncate_metrics,
)
from llm_mp.models import HEAD_PARAMS
from llm_mp.precision import loss_scale_kind
from llm_mp.rundir import (
  check_config,
  check_corpus,
  check_workdir,
  load_run,
  restore_run_variables,
  stored_config,
  with_absolute_paths,
  with_schedule_steps,
  workdir_lock,
  write_config,
)
from llm_mp.state import abstract_train_state, bytes_per_param, create_sharded_state, param_count
from llm_mp.step import make_eval_step, make_train_step
from llm_mp.tasks import TaskSpec, task_spec


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
  abstract = abstract_train_state(recipe.model, recipe.tx, config, mesh, rng)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  frozen = frozen_count(config, abstract.params)
  say(
    f"model: {config.model.family}, task {recipe.task.name}, "
    f"{param_count(abstract.params):,} parameters ({frozen:,} frozen), attention "
    f"{recipe.config.model.attention_impl} ({jax.default_backend()}); loss scale "
    f"{loss_scale_kind(config.precision.policy, config.precision.loss_scale)}; "
    f"{recipe.precision.describe(module_paths(abstract.params))}"
  )
  mem = sharding.state_memory_report(abstract)
  say(
    f"mesh: {dict(mesh.shape)}; per device: params {mem['params_bytes'] / 2**20:.1f} MiB, "
    f"optimizer state {mem['opt_state_bytes'] / 2**20:.1f} MiB; "
    f"{bytes_per_param(abstract):.2f} bytes per parameter (params + optimizer state)"
  )
  restored = checkpoint.restore_latest(ckpt, abstract)
  if restored is None:
    source = config.train.init_from
    loaded = None
    if source:  # checked by validate: a run of the same architecture
      source_config = stored_config(source)
      params, _, step = restore_run_variables(source, source_config, mesh, tokenizer)
      keep = kept_heads(config, source_config)
      fresh = sorted(set(abstract.params) & set(HEAD_PARAMS) - set(keep))
      if not fresh:  # every parameter is the source's: no random initialisation to run
        loaded = load_backbone(abstract.params, params, source, keep)
    state, _ = create_sharded_state(
      recipe.model, recipe.tx, config, mesh, rng, params=loaded, abstract=abstract
    )
    if source:
      if fresh:  # the fresh heads as initialised, the rest the source's
        state = state.replace(params=load_backbone(state.params, params, source, keep))
      say(
        f"backbone from {source} (step {step}); heads kept: {', '.join(keep) or 'none'}; "
        f"fresh: {', '.join(fresh) or 'none'}"
      )
    return Run(config, recipe, mesh, rules, state, shardings, None, 0)
  state, data_state, step = restored
  say(f"resumed from step {step}")
  return Run(config, recipe, mesh, rules, state, shardings, data_state, step)


def validate(config: Config, new_run: bool = True) -> None:
  """Checks what only devices and the policy parser can check, before anything
  is written: the task, the precision spec (no weight-only format: those hold integers that
  take no gradient), the freeze / override / format patterns, the mesh, that the
  batch splits over it, and for a ``new_run`` that ``train.init_from`` is a run of the
  same architecture (a resumed run restores its own checkpoint)."""
  spec = task_spec(config)  # a known task that the model family runs
  if config.train.teacher and spec.frozen is None:
    raise ValueError(
      f"train.teacher={config.train.teacher} is read by train.task='distill' only, "
      f"not {spec.name!r}; add --task distill"
    )
  source = config.train.init_from
  if source and new_run:
    if not os.path.isdir(source):
      raise ValueError(f"train.init_from={source}: no such run directory")
    source_config = stored_config(source)
    if source_config is None:
      raise ValueError(f"train.init_from={source} has no config.json: not a run directory")
    check_init_from(config, source_config, source)
  frozen = sorted({fmt for _, fmt in run_precision(config).formats} & set(weight_only_formats()))
  if frozen:
    raise ValueError(
      f"precision.formats={config.precision.formats!r}: {frozen[0]} stores integer weights "
      "for eval and generate (written by llm-mp quantize); train with precision.formats=int8"
    )
  check_patterns(config)  # freeze, override and format patterns match the model
  mesh = sharding.make_mesh(config.mesh)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % rows:
    raise ValueError(
      f"train.batch_size={config.train.batch_size} does not split over the "
      f"mesh's {rows} batch shards (data*fsdp)"
    )


def prepare_task_data(config: Config, workdir: str, spec: TaskSpec | None = None):
  """The data of ``config``'s task (``spec``, default its registry entry), prepared by
  the entry's ``data.prepare``. A fine-tuning run (``train.init_from``) uses its source
  run's tokenizer, else a distilled one (``train.teacher``) its teacher's."""
  spec = spec or task_spec(config)
  t = config.train
  source = t.init_from or t.teacher
  tokenizer = data.load_tokenizer(source) if source else None
  return spec.data.prepare(config, workdir, tokenizer, write=True)


@contextlib.contextmanager
def _stop_on_signal():
  """Turns SIGINT/SIGTERM into a flag, so the trainer stops between phases or
  steps (saving in the loop) instead of raising inside XLA or a file write."""
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


def check_data(config: Config, prepared: Any, spec: TaskSpec) -> bool:
  """Checks before step 1 what would otherwise fail later: the tokenizer fits
  the model, and what the task checks of its data (rows pack, evaluation has
  data, the classes fit the head).

  Returns whether evaluation is on.

  Raises:
    ValueError: naming the field (and the split) at fault.
  """
  if config.model.vocab_size < prepared.tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={config.model.vocab_size} is smaller than the "
      f"tokenizer's vocabulary ({prepared.tokenizer.vocab_size})"
    )
  return spec.data.check(config, prepared)


def _sample(
  config: Config, spec: TaskSpec, model: Any, variables: Any, tokenizer: Any
) -> str | None:
  """Text of up to ``train.sample_tokens`` tokens after ``train.sample_prompt``
  (temperature 0.8, seed ``train.seed``, clipped to the context), or None when
  ``sample_tokens == 0``, the task continues no prompt or the prompt fills the
  context. ``variables``: the state's (the params and any fp8 scales)."""
  t = config.train
  if not spec.continues_prompt:
    return None
  room = config.model.max_len - len(encode_prompt(tokenizer, t.sample_prompt))
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
  config validates. SIGINT/SIGTERM set a flag (from the first line on), checked
  between phases (data preparation, model building) and after every step: in the
  loop it saves a checkpoint, before step 1 there is nothing to save; either way
  it returns ``{"interrupted": signal name}`` and the same call resumes.
  ``until`` stops (with a checkpoint) after that step, as a preempted job
  would; the schedule still runs to ``optim.schedule_steps``.
  """
  with _stop_on_signal() as stop:  # from here on, a signal is a flag checked between phases
    sharding.maybe_initialize_distributed()
    check_workdir(workdir)
    stored = stored_config(workdir)
    config = with_schedule_steps(with_absolute_paths(config), stored)
    check_config(workdir, config)
    validate(config, new_run=stored is None)
    is_main = jax.process_index() == 0
    fresh = not os.path.isdir(workdir) or not os.listdir(workdir)
    lock = workdir_lock(workdir) if is_main else contextlib.nullcontext()
    try:
      with lock:
        return _train_locked(config, workdir, verbose, until, is_main, stop)
    except ValueError:
      # A check that fails before the first checkpoint of a new run (its data, its
      # init_from) leaves no half-made run directory behind: no lock, tokenizer or cache.
      checkpoints = os.path.join(workdir, "checkpoints")
      if fresh and is_main and not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        shutil.rmtree(workdir, ignore_errors=True)
      raise


def _stopped_before_loop(stop: dict, phase: str, say) -> dict[str, Any]:
  """The result of a run stopped by a signal before step 1: nothing to save, and
  what was written (atomically) is reused by the next run of the same command."""
  say(f"{stop['stop']} during {phase}: stopped before step 1; run the same command to start again")
  return {"interrupted": stop["stop"]}


def _train_locked(
  config: Config, workdir: str, verbose: bool, until: int | None, is_main: bool, stop: dict
) -> dict[str, Any]:
  say = print if verbose and is_main else (lambda *a, **k: None)
  spec = task_spec(config)
  if stop["stop"]:
    return _stopped_before_loop(stop, "start-up", say)
  prepared = prepare_task_data(config, workdir, spec)
  if stop["stop"]:  # data preparation: corpus, tokenizer (BPE training), token files
    return _stopped_before_loop(stop, "data preparation", say)
  say(prepared)
  eval_on = check_data(config, prepared, spec)
  check_corpus(workdir, config.data.paths, prepared.sha256, write=is_main)
  t = config.train
  ckpt = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)
  run = build(config, ckpt, say, prepared.tokenizer)
  if stop["stop"]:  # building: initialising (compiled) or restoring the state
    return _stopped_before_loop(stop, "model building", say)
  state = run.state
  start = int(state.step)
  if start >= t.steps:
    say(f"{workdir} already trained to step {start} (train.steps={t.steps}); nothing to do")
    return {}
  if is_main:
    write_config(workdir, config)
    truncate_metrics(workdir, start)  # a resumed run repeats the steps after its checkpoint
  train_iter = spec.data.train_batches(prepared, config)
  if run.data_state is not None:
    train_iter.set_state(run.data_state)
  r = run.recipe
  # The task's read-only inputs (distill's teacher), on this run's mesh and rules.
  load = lambda source: load_run(source, mesh_config=config.mesh)
  frozen = spec.frozen(config, load, prepared.tokenizer) if spec.frozen else None
  step_fn = sharding.jit_train_step(
    make_train_step(r.model, r.tx, r.schedule, config, r.task),
    run.shardings,
    run.mesh,
    run.rules,
    r.task.batch_axes,
    frozen,
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
  bar = None  # started after the first step's call, so its rate and ETA leave out compilation
  loss_scaled = loss_scale_kind(config.precision.policy, config.precision.loss_scale) != "none"
  t0, step0 = time.perf_counter(), start
  # A signal during the first step's compilation stops after step 1, with a checkpoint.
  for step in range(start + 1, min(t.steps, until or t.steps) + 1):
    batch = sharding.shard_batch(next(train_iter), run.mesh, run.rules, r.task.batch_axes)
    state, metrics = step_fn(state, batch)
    if bar is None:
      bar = progress_bar(t.steps, step, enabled=is_main and verbose)
    else:
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
        batches = spec.data.eval_batches(prepared, config, t.eval_batches or None)
        last.update(evaluate(eval_fn, state.variables, batches, run.mesh, run.rules, r.task))
        sample = _sample(config, spec, run.model, state.variables, prepared.tokenizer)
        if sample is not None:
          last["sample"] = sample
          if is_main and verbose:
            bar.write(f"step {step} sample: {t.sample_prompt}{sample}")
      writer.write(step, last)
      bar.set_postfix_str(bar_postfix(last, loss_scaled))
      t0, step0 = time.perf_counter(), step  # evaluation time does not count as training
    if step % t.ckpt_every == 0 or step in (t.steps, until) or stop["stop"]:
      checkpoint.save(ckpt, step, state, train_iter.get_state(), force=True)
    if stop["stop"]:
      last["interrupted"] = stop["stop"]
      break
  if bar is not None:
    bar.close()
  checkpoint.wait(ckpt)
  writer.close()
  if is_main and verbose and "interrupted" in last:
    print(
      f"{last['interrupted']}: checkpoint saved at step {int(state.step)}; "
      "run the same command to resume"
    )
  return last
