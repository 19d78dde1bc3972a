"""The task registry: ``train.task`` name -> :class:`~llm_mp.tasks.base.TaskSpec`.

Every caller (config checks, the CLI's choices, the training loop's data,
``llm-mp eval``, ``llm-mp diagnose``, prediction, the experiments) asks the
registry; nothing branches on a task's name. A task is one file that defines
a ``TaskSpec`` plus one :func:`register_task` call (``llm_mp/tasks/__init__.py``
for the built-in ones; a test or a user's module may register its own).
"""

from __future__ import annotations

from typing import Any

from llm_mp.tasks.base import Task, TaskSpec

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
  """Adds ``spec`` under ``spec.name`` (replacing an entry of that name); returns it."""
  TASKS[spec.name] = spec
  return spec


def unregister_task(name: str) -> None:
  """Removes the entry ``name`` (tests that registered their own)."""
  TASKS.pop(name, None)


def task_names() -> tuple[str, ...]:
  """The registered task names, sorted (the choices of ``train.task`` besides "auto")."""
  return tuple(sorted(TASKS))


def task_name(config: Any) -> str:
  """``train.task``, with "auto" resolved to the model family's default task.

  Raises:
    ValueError: "auto" for a family no task is the default of.
  """
  if config.train.task != "auto":
    return config.train.task
  for spec in TASKS.values():
    if config.model.family in spec.default_for:
      return spec.name
  raise ValueError(
    f"train.task='auto': model.family={config.model.family!r} has no default task; "
    f"name one of {list(task_names())}"
  )


def task_spec(config: Any) -> TaskSpec:
  """The registry entry of ``config``'s task, checked against its model family.

  Raises:
    ValueError: an unknown task (the message lists the registered ones), or a
      task the model family cannot run.
  """
  name = task_name(config)
  if name not in TASKS:
    raise ValueError(f"unknown train.task={name!r}; known: {['auto', *task_names()]}")
  spec = TASKS[name]
  if config.model.family not in spec.families:
    raise ValueError(
      f"train.task={name!r} needs model.family in {list(spec.families)}, "
      f"got model.family={config.model.family!r}"
    )
  return spec


def make_task(config: Any, tokenizer: Any = None) -> Task:
  """The :class:`Task` of ``config`` (its loss bound to the run's options).

  Args:
    config: the run's config.
    tokenizer: the run's tokenizer (``mlm`` reads its special ids).

  Raises:
    ValueError: as :func:`task_spec`, or a task that needs the tokenizer.
  """
  spec = task_spec(config)
  return Task(
    spec.name,
    spec.head,
    spec.batch_axes,
    spec.make_loss(config, tokenizer),
    unit=spec.unit,
    perplexity=spec.perplexity,
  )
