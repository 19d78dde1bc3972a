"""The seams every model family uses: task losses, recorded auxiliary losses and
metrics, per-key batch shardings, non-parameter state, freezing and backbones."""

import dataclasses
import functools

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import checkpoint, sharding
from llm_mp.builder import build_recipe, kept_heads, load_backbone
from llm_mp.config import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  PrecisionConfig,
  TrainConfig,
  apply_overrides,
)
from llm_mp.models import TransformerLM
from llm_mp.precision import make_precision
from llm_mp.presets import get_preset
from llm_mp.state import abstract_train_state, create_sharded_state, make_init_fn
from llm_mp.step import make_eval_step, make_train_step
from llm_mp.tasks import LM_BATCH_AXES, Task, apply_model, collect_sown, lm_loss

T, B, V = 8, 4, 32


def _config(**kw):
  optim = kw.pop(
    "optim",
    OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=None),
  )
  return Config(
    model=ModelConfig.llama(
      vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_len=T, **kw.pop("model", {})
    ),
    optim=optim,
    data=DataConfig(seq_len=T),
    train=TrainConfig(batch_size=B, **kw.pop("train", {})),
    **kw,
  )


def _batch(seed=0, b=B):
  tokens = np.random.default_rng(seed).integers(0, V, (b, T + 1)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": np.ones((b, T), np.int32),
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy(),
  }


class _Recording(nn.Module):
  """A TransformerLM plus a recorded loss, a recorded metric and a counter in a
  non-parameter collection ("stats"), as MoE and fp8 layers use them."""

  config: ModelConfig
  aux_weight: float = 0.0
  precision: str = "fp32"

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, deterministic=True):
    logits = TransformerLM(self.config, make_precision(self.precision), name="lm")(
      tokens, segment_ids, positions, deterministic
    )
    w = self.param("w", nn.initializers.ones, ())
    calls = self.variable("stats", "calls", lambda: jnp.zeros((), jnp.int32))
    amax = self.variable("stats", "amax", lambda: jnp.zeros((), jnp.float32))
    if not self.is_initializing():
      calls.value += 1
      amax.value = jnp.maximum(amax.value, jnp.max(jnp.abs(logits)))
    self.sow("losses", "penalty", self.aux_weight * jnp.square(w - 3.0))
    self.sow("metrics", "w_value", w)
    return logits


def _setup(model, config, mesh_cfg=MeshConfig(data=1)):
  r = build_recipe(config)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp])
  rules = sharding.logical_rules(mesh_cfg)
  state, shardings = create_sharded_state(model, r.tx, config, mesh, jax.random.key(0))
  step = sharding.jit_train_step(
    make_train_step(model, r.tx, r.schedule, config, r.task),
    shardings,
    mesh,
    rules,
    r.task.batch_axes,
  )
  return r, state, step, mesh, rules


@pytest.mark.slow
def test_recorded_losses_reach_the_loss_and_the_gradient():
  config = _config()
  model = _Recording(config.model, aux_weight=0.5)
  variables = compiled.init(model, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  variables = {"params": variables["params"], "stats": variables["stats"]}
  batch = jax.tree.map(jnp.asarray, _batch())
  loss, aux = jax.jit(lambda v: lm_loss(model, v, batch, None))(variables)
  # w = 1 at init: penalty 0.5 * (1 - 3)^2 = 2.0 on top of the cross-entropy.
  np.testing.assert_allclose(float(loss - aux["loss"]), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux["w_value"]), 1.0)
  grad = jax.jit(jax.grad(lambda p: lm_loss(model, {**variables, "params": p}, batch, None)[0]))(
    variables["params"]
  )
  np.testing.assert_allclose(float(grad["w"]), 0.5 * 2 * (1.0 - 3.0), rtol=1e-6)
  assert int(aux["model_state"]["stats"]["calls"]) == 1


def test_collect_sown_averages_scanned_and_unscanned_layers_alike():
  values = [jnp.float32(1.0), jnp.float32(3.0)]
  unscanned = {
    "decoder": {"blocks_0": {"mlp": {"m": (values[0],)}}, "blocks_1": {"mlp": {"m": (values[1],)}}}
  }
  scanned = {"decoder": {"blocks": {"block": {"mlp": {"m": (jnp.stack(values),)}}}}}
  losses = {"decoder": {"blocks": {"block": {"mlp": {"l": (jnp.stack(values),)}}}}}
  for tree in (unscanned, scanned):
    aux, metrics = collect_sown(losses, tree)
    np.testing.assert_allclose(float(aux), 4.0)  # losses add up over layers
    np.testing.assert_allclose(float(metrics["m"]), 2.0)  # metrics average


@pytest.mark.slow
def test_train_step_updates_and_checkpoints_model_state(tmp_path):
  config = _config()
  model = _Recording(config.model)
  r, state, step, mesh, rules = _setup(model, config)
  assert int(state.model_state["stats"]["calls"]) == 0
  for i in range(3):
    state, metrics = step(state, sharding.shard_batch(_batch(i), mesh, rules))
  assert int(state.model_state["stats"]["calls"]) == 3
  assert float(state.model_state["stats"]["amax"]) > 0
  np.testing.assert_allclose(float(metrics["w_value"]), 1.0)  # the recorded metric
  manager = checkpoint.make_manager(str(tmp_path / "ck"))
  checkpoint.save(manager, 3, state, {}, force=True)
  checkpoint.wait(manager)
  abstract = abstract_train_state(model, r.tx, config, mesh, jax.random.key(0))
  restored, _, _ = checkpoint.restore_latest(manager, abstract)
  chex.assert_trees_all_equal(
    jax.device_get(restored.model_state), jax.device_get(state.model_state)
  )


@pytest.mark.slow
def test_non_finite_step_keeps_the_model_state():
  config = _config(
    precision=PrecisionConfig(policy="fp16", loss_scale="static", init_loss_scale=2.0**40)
  )  # overflows fp16 gradients
  model = _Recording(config.model, precision="fp16")
  _, state, step, mesh, rules = _setup(model, config)
  before = jax.device_get(state.model_state)
  state, metrics = step(state, sharding.shard_batch(_batch(), mesh, rules))
  assert not bool(metrics["grads_finite"])
  chex.assert_trees_all_equal(jax.device_get(state.model_state), before)


def test_a_custom_task_loss_plugs_into_the_step():
  # Regression onto the first token's logit: nothing in the step assumes token cross-entropy.
  def loss_fn(model, variables, batch, rng):
    logits, aux_loss, metrics, model_state = apply_model(model, variables, batch["inputs"], rng=rng)
    err = jnp.mean(jnp.square(logits[:, 0, 0] - batch["goal"]))
    return err + aux_loss, {
      "weight": jnp.float32(batch["goal"].shape[0]),
      "loss": err,
      "model_state": model_state,
      **metrics,
    }

  task = Task(
    "regress",
    "lm",
    {"inputs": ("batch", "length"), "goal": ("batch",)},
    loss_fn,
    unit="examples",
    perplexity=False,
  )
  config = _config()
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, task))
  batch = {"inputs": jnp.asarray(_batch()["inputs"]), "goal": jnp.full((B,), 2.0)}
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert float(m["examples"]) == B
  assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.multidevice
def test_batch_keys_are_sharded_as_the_task_declares():
  mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2), jax.devices())
  rules = sharding.logical_rules(MeshConfig(data=4, fsdp=2))
  axes = {"inputs": ("batch", "length"), "labels": ("batch",)}
  out = sharding.shard_batch(
    {"inputs": np.zeros((8, T), np.int32), "labels": np.arange(8, dtype=np.int32)},
    mesh,
    rules,
    axes,
  )
  assert out["labels"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert out["labels"].addressable_shards[0].data.shape == (1,)
  np.testing.assert_array_equal(np.asarray(out["labels"]), np.arange(8))
  with pytest.raises(ValueError, match=r"batch key\(s\) \['extra'\] have no declared sharding"):
    sharding.shard_batch({"extra": np.zeros((8,), np.int32)}, mesh, rules, axes)


@pytest.mark.slow
def test_accumulation_weighs_micro_batches_by_their_counts():
  # Two micro-batches with different numbers of counted tokens: a plain mean of
  # micro-batch means would be wrong; the weighted combination is the full mean.
  def cfg(k):
    return _config(
      optim=OptimConfig(
        name="sgd",
        lr=0.5,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        clip_norm=None,
        grad_accum_steps=k,
      )
    )

  batch = _batch()
  batch["targets"][:2, 2:] = -1  # the first half counts 2 of 8 tokens per row
  results = []
  for k in (1, 2):
    r = build_recipe(cfg(k))
    state = jax.jit(make_init_fn(r.model, r.tx, cfg(k)))(jax.random.key(0))
    state, m = jax.jit(make_train_step(r.model, r.tx, r.schedule, cfg(k), r.task))(
      state, jax.tree.map(jnp.asarray, batch)
    )
    results.append((state.params, m))
  chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-6)
  np.testing.assert_allclose(float(results[0][1]["loss"]), float(results[1][1]["loss"]), rtol=1e-6)
  assert float(results[1][1]["tokens"]) == 2 * 2 + 2 * 8


def test_frozen_parameters_stay_bit_identical():
  config = _config(train={"freeze": "embed/*,decoder/blocks_0/*"})
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  before = jax.device_get(state.params)
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task))
  for i in range(3):
    state, _ = step(state, jax.tree.map(jnp.asarray, _batch(i)))
  after = jax.device_get(state.params)
  chex.assert_trees_all_equal(after["embed"], before["embed"])
  chex.assert_trees_all_equal(after["decoder"]["blocks_0"], before["decoder"]["blocks_0"])
  assert not np.array_equal(
    after["decoder"]["blocks_1"]["attn"]["query"]["kernel"],
    before["decoder"]["blocks_1"]["attn"]["query"]["kernel"],
  )


@pytest.mark.slow
def test_backbone_lr_scale_zero_trains_only_the_head():
  config = _config(train={"backbone_lr_scale": 0.0})
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  before = jax.device_get(state.params)
  state, _ = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task))(
    state, jax.tree.map(jnp.asarray, _batch())
  )
  after = jax.device_get(state.params)
  chex.assert_trees_all_equal(
    {k: v for k, v in after.items() if k != "lm_head"},
    {k: v for k, v in before.items() if k != "lm_head"},
  )
  assert not np.array_equal(after["lm_head"]["kernel"], before["lm_head"]["kernel"])


@functools.cache
def _params(seed):
  config = _config()
  r = build_recipe(config)
  return jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(seed)).params


def test_load_backbone_keeps_fresh_heads_and_checks_shapes():
  config = _config()
  fresh, source = _params(0), _params(1)
  loaded = load_backbone(fresh, source, "src")
  chex.assert_trees_all_equal(loaded["decoder"], source["decoder"])
  chex.assert_trees_all_equal(loaded["embed"], source["embed"])
  chex.assert_trees_all_equal(loaded["lm_head"], fresh["lm_head"])
  kept = load_backbone(fresh, source, "src", keep_heads=("lm_head",))
  chex.assert_trees_all_equal(kept["lm_head"], source["lm_head"])
  # Identical backbone outputs: the final hidden states agree (the heads differ).
  model = build_recipe(config).model
  tokens = jnp.asarray(_batch()["inputs"])
  hidden = lambda p: model.apply(
    {"params": p}, tokens, capture_intermediates=True, mutable=["intermediates"]
  )[1]["intermediates"]["final_norm"]
  chex.assert_trees_all_equal(hidden(loaded), hidden(source))
  wider = dict(source, embed={"embedding": jnp.zeros((V + 1, 16))})
  with pytest.raises(
    ValueError,
    match=r"parameter 'embed/embedding' is float32\[33, 16\] "
    r"there but float32\[32, 16\] here",
  ):
    load_backbone(fresh, wider, "src")
  with pytest.raises(ValueError, match="has no parameter 'decoder/blocks_1/"):
    load_backbone(fresh, {**source, "decoder": {"blocks_0": source["decoder"]["blocks_0"]}}, "src")


def test_eval_step_sums_are_the_task_means():
  config = _config()
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, _batch())
  out = jax.jit(make_eval_step(r.model, r.task))(state.variables, batch)
  loss, aux = r.task.loss_fn(r.model, state.variables, batch, None)
  np.testing.assert_allclose(
    float(out["loss_sum"]) / float(out["tokens"]), float(aux["loss"]), rtol=1e-6
  )
  assert set(r.task.batch_axes) == set(LM_BATCH_AXES)


def test_auto_attention_is_cudnn_only_on_gpu_with_half_compute():
  from llm_mp.builder import resolve_backend_choices  # pylint: disable=import-outside-toplevel

  config = _config()
  assert config.model.attention_impl == "auto"
  impl = lambda precision, backend: (
    resolve_backend_choices(config, make_precision(precision), backend).model.attention_impl
  )
  assert [impl(p, "gpu") for p in ("bf16", "fp16", "pure_bf16", "fp32")] == [
    "cudnn",
    "cudnn",
    "cudnn",
    "xla",
  ]
  assert [impl(p, "cpu") for p in ("bf16", "fp32")] == ["xla", "xla"]
  assert build_recipe(config).config.model.attention_impl == "xla"  # this test runs on CPU
  explicit = dataclasses.replace(
    config, model=dataclasses.replace(config.model, attention_impl="xla")
  )
  assert resolve_backend_choices(explicit, make_precision("bf16"), "gpu") is explicit


def test_fine_tuning_keeps_the_heads_the_source_task_shares():
  decoder = _config()
  src_lm = dataclasses.replace(decoder, train=dataclasses.replace(decoder.train, task="lm"))
  assert kept_heads(decoder, src_lm) == ("lm_head",)  # LM into LM: the output layer is kept
  encoder = get_preset("encoder_tiny")
  classify = apply_overrides(encoder, ["train.task=classify"])
  assert kept_heads(classify, encoder) == ()  # MLM into classification: a fresh classifier
  assert kept_heads(apply_overrides(classify, ["train.task=classify"]), classify) == (
    "pooler",
    "classifier",
  )
  assert kept_heads(apply_overrides(decoder, ["train.reinit_heads=all"]), src_lm) == ()
  assert kept_heads(apply_overrides(decoder, ["train.reinit_heads=lm_head"]), src_lm) == ()
  with pytest.raises(ValueError, match="train.reinit_heads='embed': 'embed' is not a head"):
    kept_heads(apply_overrides(decoder, ["train.reinit_heads=embed"]), src_lm)
