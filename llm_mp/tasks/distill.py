"""``distill``: knowledge distillation (Hinton et al. 2015), a student trained on
the data and on a teacher run's softened outputs.

Per counted token (decoders: every next-token target, as ``lm``; encoders: the
positions ``mlm`` masks, the teacher reading the same corrupted input):

  loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(p_teacher,T || p_student,T)

with ``p_x,T = softmax(logits_x / T)`` in fp32, ``alpha = train.distill_weight``
and ``T = train.distill_temperature``; the T^2 keeps the soft term's gradient
the size of the hard term's whatever T (Hinton et al., section 2). Recorded
auxiliary losses and the z-loss are added as in ``lm``. The reported ``loss`` is
the data cross-entropy alone (so the perplexity is the data's, comparable with a
student trained without a teacher) and ``kl`` the KL term before weighting.
Evaluation (``rng`` None, no teacher) computes the data loss alone, so
``llm-mp eval`` of a distilled run needs no teacher and equals training's.

How the teacher reaches the jitted step. A loss that closed over the teacher's
arrays would make them constants of the compiled program (jit embeds closed-over
arrays in the HLO: a second copy of every teacher weight, a slow compile for
big models). So the teacher is an argument: :data:`SPEC`'s ``frozen`` hook
(:func:`load_teacher`) is called once by the training loop with a loader of run
directories (``llm_mp.rundir.load_run`` on the student's mesh and rules, passed
in so that this module imports nothing above the task layer); the step gets its
result as a third jit argument, not donated, and adds it to the loss's
``variables`` under :data:`TEACHER`. The :class:`Teacher` value is a pytree whose
leaves are the teacher's arrays and whose static part is its flax module (built
from the teacher's own config: its own precision). It never enters the
TrainState, so checkpoints hold the student only, and a resumed run loads the
teacher again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.tasks.base import LM_BATCH_AXES, Batch, TaskSpec, apply_model, cross_entropy, loss_mask
from llm_mp.tasks.lm import CORPUS, predict_continuation
from llm_mp.tasks.mlm import mask_batch, masking_options, predict_reconstruction

TEACHER = "teacher"  # the read-only collection of the loss's variables holding the Teacher


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["variables"], meta_fields=["model"]
)
@dataclasses.dataclass(frozen=True)
class Teacher:
  """A run the student learns from: a pytree (jit traces ``variables``; ``model``,
  hashable, is static).

  Attributes:
    model: the teacher's flax module, built with its own precision policy.
    variables: ``{"params": ..., **collections}`` on the student's mesh.
  """

  model: nn.Module
  variables: dict[str, Any]


def soft_kl(
  teacher_logits: jax.Array, student_logits: jax.Array, temperature: float, weights: jax.Array
) -> jax.Array:
  """``sum_i w_i * KL(softmax(t_i / T) || softmax(s_i / T))`` in fp32.

  Args:
    teacher_logits, student_logits: ``[..., V]`` any float dtype (cast to fp32
      here, like the cross-entropy).
    temperature: ``T > 0``.
    weights: ``[...]`` bool or 0/1: the positions counted.

  Returns:
    fp32 scalar: the weighted sum over positions (divide by the count for a mean).
  """
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return jnp.sum(kl * weights.astype(jnp.float32))


def _next_token_view(batch: Batch, rng):
  """Decoders: the inputs as given, ``lm``'s targets and mask."""
  return batch["inputs"], batch["targets"], loss_mask(batch), rng


def _masked_view(batch: Batch, rng, **masking):
  """Encoders: ``mlm``'s corrupted inputs; its selected positions count."""
  masked, targets, dropout_rng = mask_batch(batch, rng, **masking)
  return masked, targets, targets >= 0, dropout_rng


def distill_loss(
  model,
  variables,
  batch: Batch,
  rng,
  *,
  view,
  alpha: float,
  temperature: float,
  z_weight: float = 0.0,
):
  """The distillation loss (module docstring). ``batch`` as for ``lm_loss``;
  ``variables[TEACHER]`` the :class:`Teacher` (required in training; without it,
  evaluation, the data loss alone); ``view(batch, rng) -> (inputs, targets,
  mask, dropout_rng)`` picks the model inputs and the counted positions."""
  variables = dict(variables)
  teacher = variables.pop(TEACHER, None)
  if teacher is None and rng is not None:
    raise ValueError(
      f"train.task='distill' trains with a teacher: the step got no {TEACHER!r} collection "
      "(jit the step with sharding.jit_train_step(..., frozen=spec.frozen(...)))"
    )
  inputs, targets, mask, dropout_rng = view(batch, rng)
  extra = {"segment_ids": batch.get("segment_ids"), "positions": batch.get("positions")}
  logits, aux_loss, metrics, model_state = apply_model(
    model, variables, inputs, rng=dropout_rng, **extra
  )
  nll, z, count = cross_entropy(logits, targets, mask)
  n = jnp.maximum(count, 1.0)
  ce = nll / n
  aux = {**metrics, "weight": count, "loss": ce, "model_state": model_state}
  if teacher is None:
    return ce + z_weight * z / n + aux_loss, aux
  # The teacher: deterministic, in its own precision, its collections' updates dropped.
  teacher_logits, *_ = apply_model(teacher.model, teacher.variables, inputs, rng=None, **extra)
  weights = mask.astype(bool) & (targets >= 0)  # the positions cross_entropy counts
  kl = soft_kl(jax.lax.stop_gradient(teacher_logits), logits, temperature, weights) / n
  loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
  return loss + z_weight * z / n + aux_loss, {**aux, "kl": kl}


def make_distill_loss(config, tokenizer):
  """:func:`distill_loss` with the run's weight, temperature and z-loss, reading
  the data as the family's own task does (decoders: ``lm``; encoders: ``mlm``,
  with the run's masking probability and the tokenizer's special ids).

  Raises:
    ValueError: no ``train.teacher``, or an encoder run without a tokenizer.
  """
  t = config.train
  if not t.teacher:
    raise ValueError("train.task='distill' needs train.teacher (--teacher RUN): a run directory")
  if config.model.family == "encoder":
    view = functools.partial(
      _masked_view, probability=t.mlm_probability, **masking_options(tokenizer)
    )
  else:
    view = _next_token_view
  return functools.partial(
    distill_loss,
    view=view,
    alpha=t.distill_weight,
    temperature=t.distill_temperature,
    z_weight=t.z_loss,
  )


def load_teacher(config, load_run, tokenizer) -> dict[str, Teacher]:
  """``{TEACHER: Teacher}`` of run ``train.teacher`` (:data:`SPEC`'s ``frozen``).

  Args:
    config: the student's config.
    load_run: ``workdir -> LoadedRun``, the run on the student's mesh and rules.
    tokenizer: the student's tokenizer.

  Raises:
    ValueError: the teacher is another model family, has another vocabulary
      size, or another tokenizer (ids would mean other tokens).
  """
  source = config.train.teacher
  run = load_run(source)
  t, s = run.config.model, config.model
  if t.family != s.family:
    raise ValueError(
      f"train.teacher={source}: its model.family={t.family!r} differs from the student's "
      f"{s.family!r}"
    )
  if t.padded_vocab != s.padded_vocab:
    raise ValueError(
      f"train.teacher={source}: its vocabulary has {t.padded_vocab} logits, the "
      f"student's {s.padded_vocab}"
    )
  if tokenizer is not None and run.tokenizer.to_json() != tokenizer.to_json():
    raise ValueError(
      f"train.teacher={source}: its tokenizer differs from the student's; train the student "
      "with the teacher's (a new run without --init-from takes it by default)"
    )
  return {TEACHER: Teacher(run.model, run.variables)}


def predict(run, texts: Sequence[str], **options) -> list[str]:
  """What the family's own task predicts: a continuation (decoders), the
  reconstruction (encoders)."""
  if run.config.model.family == "encoder":
    return predict_reconstruction(run, texts)
  return predict_continuation(run, texts, **options)


SPEC = TaskSpec(
  name="distill",
  families=("decoder", "encoder"),
  head="lm",
  batch_axes=LM_BATCH_AXES,
  make_loss=make_distill_loss,
  data=CORPUS,
  predict=predict,
  frozen=load_teacher,
)
