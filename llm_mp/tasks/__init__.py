"""Tasks: what a batch holds, how each of its keys is sharded, the loss, how the
data is prepared and evaluated, and what a trained model predicts.

One file per task (``lm``, ``mlm``, ``classify``, ``seq2seq``, ``span``, ``distill``), each
defining a :class:`TaskSpec`; one line per task below registers it. ``corpus`` and
``examples`` hold the data functions tasks share. ``llm_mp.tasks.base``
holds what they share (the bound :class:`Task`, :func:`apply_model`,
:func:`cross_entropy`); ``llm_mp.tasks.registry`` the lookup every caller uses.
"""

from llm_mp.tasks import classify, distill, lm, mlm, seq2seq, span
from llm_mp.tasks.base import (
  LM_BATCH_AXES,
  TOKEN_AXES,
  TRANSIENT_COLLECTIONS,
  Batch,
  Task,
  TaskData,
  TaskSpec,
  apply_model,
  collect_sown,
  cross_entropy,
  loss_mask,
  token_loss,
)
from llm_mp.tasks.lm import lm_loss
from llm_mp.tasks.registry import (
  TASKS,
  make_task,
  register_task,
  task_name,
  task_names,
  task_spec,
  unregister_task,
)

register_task(lm.SPEC)
register_task(mlm.SPEC)
register_task(classify.SPEC)
register_task(seq2seq.SPEC)
register_task(span.SPEC)
register_task(distill.SPEC)

__all__ = [
  "LM_BATCH_AXES",
  "TASKS",
  "TOKEN_AXES",
  "TRANSIENT_COLLECTIONS",
  "Batch",
  "Task",
  "TaskData",
  "TaskSpec",
  "apply_model",
  "collect_sown",
  "cross_entropy",
  "lm_loss",
  "loss_mask",
  "make_task",
  "register_task",
  "task_name",
  "task_names",
  "task_spec",
  "token_loss",
  "unregister_task",
]
