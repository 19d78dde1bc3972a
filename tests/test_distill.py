"""The ``distill`` task: its loss against the closed form, its limits (a teacher equal
to the student, weight 0), a teacher left bit for bit by the step, and an end-to-end
``llm-mp train --task distill --teacher RUN`` that resumes exactly."""

from __future__ import annotations

import dataclasses

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import cli, sharding
from llm_mp.builder import build_recipe
from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer
from llm_mp.metrics import read_metrics
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run, stored_config
from llm_mp.state import create_sharded_state
from llm_mp.step import make_train_step
from llm_mp.tasks import lm_loss, make_task
from llm_mp.tasks.distill import TEACHER, Teacher, distill_loss, load_teacher, soft_kl
from llm_mp.tasks.mlm import make_mlm_loss
from llm_mp.train import train

SMALL = [
  "model.n_layers=2",
  "model.d_model=32",
  "model.n_heads=2",
  "model.n_kv_heads=1",
  "model.max_len=16",
  "data.seq_len=16",
  "train.batch_size=8",
]


class FixedLogits(nn.Module):
  """Returns its ``logits [T, V]`` parameter for every row (a hand-built distribution)."""

  table: np.ndarray

  @nn.compact
  def __call__(self, inputs, deterministic=True, segment_ids=None, positions=None):
    logits = self.param("logits", lambda _: jnp.asarray(self.table, jnp.float32))
    return jnp.broadcast_to(logits, inputs.shape + logits.shape[-1:])


def test_distill_loss_equals_its_closed_form_on_hand_built_distributions():
  alpha, temp = 0.3, 2.0
  p_student = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])  # [T=2, V=3]
  p_teacher = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
  # softmax(logits / T) = p exactly when logits = T * log p.
  student, teacher = FixedLogits(temp * np.log(p_student)), FixedLogits(temp * np.log(p_teacher))
  batch = {"inputs": jnp.zeros((1, 2), jnp.int32), "targets": jnp.asarray([[0, 2]], jnp.int32)}
  variables = {
    "params": student.init(jax.random.key(0), batch["inputs"])["params"],
    TEACHER: Teacher(teacher, teacher.init(jax.random.key(0), batch["inputs"])),
  }
  loss, aux = distill_loss(
    student,
    variables,
    batch,
    jax.random.key(1),
    view=lambda b, rng: (b["inputs"], b["targets"], b["targets"] >= 0, rng),
    alpha=alpha,
    temperature=temp,
  )
  # float64 references: the CE reads the unsoftened student (logits = T log p).
  q = np.exp(temp * np.log(p_student))
  q /= q.sum(-1, keepdims=True)
  ce = -np.mean(np.log(q[[0, 1], [0, 2]]))
  kl = np.mean(np.sum(p_teacher * np.log(p_teacher / p_student), -1))
  np.testing.assert_allclose(float(aux["loss"]), ce, rtol=1e-6)  # fp32 against float64
  np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5)
  np.testing.assert_allclose(float(loss), (1 - alpha) * ce + alpha * temp**2 * kl, rtol=1e-6)


def test_soft_kl_counts_only_the_weighted_positions():
  t = jnp.asarray([[[2.0, 0.0], [0.0, 3.0]]])
  s = jnp.zeros((1, 2, 2))
  both = soft_kl(t, s, 1.0, jnp.ones((1, 2)))
  first = soft_kl(t, s, 1.0, jnp.asarray([[1, 0]]))
  p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
  np.testing.assert_allclose(float(first), np.sum(p * np.log(p / 0.5)), rtol=1e-6)
  assert float(both) > float(first) > 0


def _student(family_preset: str, *extra: str):
  config = apply_overrides(
    get_preset(family_preset),
    [*SMALL, "train.task=distill", "train.teacher=unused", "precision.policy=fp32", *extra],
  )
  recipe = build_recipe(config, ByteTokenizer())
  params = compiled.init(recipe.model, jax.random.key(0), jnp.zeros((2, 16), jnp.int32))["params"]
  return config, recipe, params


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, 256, (8, 16)), jnp.int32)
  return {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1)}


@pytest.mark.parametrize("preset", ["tiny", "encoder_tiny"])
@pytest.mark.slow
def test_a_teacher_equal_to_the_student_gives_zero_kl_and_zero_kl_gradient(preset):
  # No dropout: the teacher runs deterministically, so only then is the student its equal.
  config, recipe, params = _student(preset, "train.distill_weight=1.0", "model.dropout=0.0")
  teacher = Teacher(recipe.model, {"params": params})

  def loss(p):
    variables = {"params": p, TEACHER: teacher}
    return recipe.task.loss_fn(recipe.model, variables, _batch(), jax.random.key(3))

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  # alpha = 1: the loss is T^2 KL alone (no recorded losses in these models).
  assert abs(float(aux["kl"])) < 1e-7 and abs(float(value)) < 1e-6
  assert float(aux["weight"]) > 0
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6


@pytest.mark.parametrize("preset", ["tiny", "encoder_tiny"])
def test_distill_weight_zero_is_plain_cross_entropy(preset):
  config, recipe, params = _student(preset, "train.distill_weight=0.0")
  other = compiled.init(recipe.model, jax.random.key(7), jnp.zeros((2, 16), jnp.int32))["params"]
  teacher = Teacher(recipe.model, {"params": other})  # a different model: KL > 0
  plain = dataclasses.replace(config, train=dataclasses.replace(config.train, task="auto"))
  plain_loss = make_task(plain, ByteTokenizer()).loss_fn
  assert plain_loss.func in (lm_loss, make_mlm_loss(plain, ByteTokenizer()).func)
  rng = jax.random.key(3)

  def ours(p):
    return recipe.task.loss_fn(recipe.model, {"params": p, TEACHER: teacher}, _batch(), rng)

  def theirs(p):
    return plain_loss(recipe.model, {"params": p}, _batch(), rng)

  (a, aux), ga = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
  (b, _), gb = jax.jit(jax.value_and_grad(theirs, has_aux=True))(params)
  assert float(aux["kl"]) > 1e-4  # two random inits: near-uniform, yet apart
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)  # fp32: one rounding apart
  chex.assert_trees_all_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_evaluation_without_a_teacher_is_the_data_loss_and_training_needs_one():
  config, recipe, params = _student("tiny")
  loss, aux = recipe.task.loss_fn(recipe.model, {"params": params}, _batch(), None)
  plain, _ = lm_loss(recipe.model, {"params": params}, _batch(), None)
  assert float(loss) == float(plain) and "kl" not in aux
  with pytest.raises(ValueError, match="trains with a teacher"):
    recipe.task.loss_fn(recipe.model, {"params": params}, _batch(), jax.random.key(0))


@pytest.mark.slow
def test_the_step_leaves_the_teacher_bit_for_bit_and_out_of_the_state():
  config, recipe, _ = _student("tiny")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  state, _ = create_sharded_state(recipe.model, recipe.tx, config, mesh, jax.random.key(0))
  teacher_state, _ = create_sharded_state(recipe.model, recipe.tx, config, mesh, jax.random.key(9))
  frozen = {TEACHER: Teacher(recipe.model, {"params": teacher_state.params})}
  before = jax.tree.map(np.asarray, frozen[TEACHER].variables)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = sharding.jit_train_step(
    make_train_step(recipe.model, recipe.tx, recipe.schedule, config, recipe.task),
    shardings,
    mesh,
    rules,
    recipe.task.batch_axes,
    frozen,
  )
  start = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    state, metrics = step(state, sharding.shard_batch(_batch(i), mesh, rules))
  assert float(metrics["kl"]) > 0
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, frozen[TEACHER].variables), before)
  assert not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params))
  )
  assert set(state.model_state) == set()  # nothing of the teacher in the state
  assert len(step.jitted) == 1  # compiled once


def _cli_train(workdir, options, overrides=(), steps=6):
  # The schedule's length fixed: a run stopped at step 3 resumes on the same schedule.
  logging = ["train.log_every=1", "train.eval_every=6", "train.ckpt_every=3"]
  logging.append("optim.schedule_steps=6")
  argv = ["train", "--workdir", str(workdir), "--steps", str(steps), *options]
  assert cli.main([*argv, *logging, *SMALL, "train.sample_tokens=0", *overrides]) == 0


@pytest.mark.slow
def test_train_with_a_teacher_resumes_exactly_and_keeps_it_out_of_checkpoints(tmp_path):
  teacher = tmp_path / "teacher"
  _cli_train(teacher, ["--preset", "tiny", "--precision", "bf16"])
  distill = ["--preset", "tiny", "--task", "distill", "--teacher", str(teacher)]
  narrow = ["model.d_model=16", "train.distill_temperature=2.0"]
  _cli_train(tmp_path / "whole", distill, narrow)
  _cli_train(tmp_path / "parts", distill, narrow, steps=3)
  _cli_train(tmp_path / "parts", distill, narrow)  # resumes from step 3
  records = lambda d: [(r["step"], r["loss"], r["kl"]) for r in read_metrics(d) if "kl" in r]
  assert len(records(tmp_path / "whole")) == 6
  assert records(tmp_path / "whole") == records(tmp_path / "parts")  # bit for bit
  config = stored_config(str(tmp_path / "whole"))
  assert config.train.teacher == str(teacher) and config.train.task == "distill"
  student = load_run(str(tmp_path / "whole"))  # the student alone: no teacher params
  assert set(student.params) == set(load_run(str(teacher)).params)
  assert student.params["embed"]["embedding"].shape[-1] == 16


@pytest.mark.slow
def test_a_teacher_of_another_family_or_without_the_distill_task_is_refused(tmp_path):
  teacher = tmp_path / "teacher"
  _cli_train(teacher, ["--preset", "tiny"])
  encoder, _, _ = _student("encoder_tiny", f"train.teacher={teacher}")
  with pytest.raises(ValueError, match="model.family='decoder' differs"):
    load_teacher(encoder, load_run, ByteTokenizer())
  lm = apply_overrides(get_preset("tiny"), [*SMALL, f"train.teacher={teacher}"])
  with pytest.raises(ValueError, match="read by train.task='distill' only"):
    train(lm, str(tmp_path / "lm"), verbose=False)
