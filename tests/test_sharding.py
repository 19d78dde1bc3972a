"""Sharded training on 8 fake CPU devices equals the single-device run.

Tolerances: the sharded and single-device programs do the same fp32
arithmetic, but XLA splits every reduction over a sharded axis (matmul
contractions, the batch mean of the loss, the global gradient norm) into
per-device partial sums combined by an all-reduce, so the summation order
differs and each result moves by a few fp32 ulps. The loss (a sum over the
batch) stays within ~2e-7 relative: LOSS_RTOL = 1e-6. The parameters differ
more, because AdamW divides each gradient by its own RMS: the first layer's
query/key gradients at init are ~1e-5 and down to 1e-8, the smallest carry a
relative reordering error of 1e-4..1e-3, and the division turns that into an
absolute update error of up to ~1e-3 * lr. Measured after 3 steps (lr =
1e-2): 6e-6 across meshes, 1.1e-5 with gradient accumulation; PARAM_ATOL =
5e-5 is ~5x that and still 200x below one update, so a missing or partial
all-reduce (errors ~lr) fails.

Compiling dominates the run time on 2 cores, so each mesh trains once
(cached) and several tests read the same run. Every run starts from the
single-device initial state, copied into the mesh's shardings;
``test_create_sharded_state_matches_single_device_init`` checks that
``create_sharded_state`` itself builds that same state, bit for bit.
"""

import dataclasses
import functools
import os
import re
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_mp import checkpoint, sharding
from llm_mp.builder import build_recipe
from llm_mp.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.state import abstract_train_state, create_sharded_state
from llm_mp.step import make_eval_step, make_train_step

pytestmark = pytest.mark.multidevice  # meshes of 2 to 8 devices

T, B, VOCAB, STEPS = 16, 16, 64, 3
LOSS_RTOL, PARAM_ATOL = 1e-6, 5e-5  # see the module docstring
SINGLE = MeshConfig(data=1)
MESHES = [
  MeshConfig(data=8),
  MeshConfig(data=1, fsdp=8),
  MeshConfig(data=4, tensor=2),
  MeshConfig(data=2, fsdp=2, tensor=2),
]
ALL3 = MESHES[-1]


def _config(mesh=SINGLE, grad_accum_steps=1, **model_kw):
  model = dict(
    vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=T
  )
  return Config(
    model=ModelConfig.llama(**{**model, **model_kw}),
    optim=OptimConfig(
      lr=1e-2, warmup_steps=0, schedule="constant", grad_accum_steps=grad_accum_steps
    ),
    data=DataConfig(seq_len=T),
    train=TrainConfig(batch_size=B, steps=STEPS),
    mesh=mesh,
  )


def _batch():
  tokens = np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _mesh(cfg):
  return sharding.make_mesh(cfg, jax.devices()[: cfg.data * cfg.fsdp * cfg.tensor])


def _model(config):
  r = build_recipe(config)
  return r.model, r.tx, r.schedule, r.precision


def _abstract(config):
  model, tx, _, precision = _model(config)
  return abstract_train_state(model, tx, config, _mesh(config.mesh), jax.random.key(0))


@functools.cache
def _initial_state():
  """The single-device initial state; runs start from copies (it is never donated)."""
  model, tx, _, precision = _model(_config())
  state, _ = create_sharded_state(model, tx, _config(), _mesh(SINGLE), jax.random.key(0))
  return state


@dataclasses.dataclass
class Run:
  losses: np.ndarray  # [STEPS]
  params: dict  # NumPy, after STEPS steps
  state: object  # the live final state
  traces: int  # how often the jitted step was traced
  eval_sum: float  # eval loss sum of the final params on the training batch


@functools.cache
def _run(mesh_cfg, grad_accum_steps=1):
  config = _config(mesh_cfg, grad_accum_steps)
  model, tx, schedule, _ = _model(config)
  mesh, rules = _mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
  shardings = jax.tree.map(lambda x: x.sharding, _abstract(config))
  # A fresh copy: device_put may alias the source's buffers, which donation would delete.
  state = jax.device_put(jax.tree.map(lambda x: x.copy(), _initial_state()), shardings)
  traces = []

  def counted_step(state, batch):
    traces.append(1)
    return make_train_step(model, tx, schedule, config)(state, batch)

  step = sharding.jit_train_step(counted_step, shardings, mesh, rules)
  losses = []
  for _ in range(STEPS):  # the same batch each step: the loss must fall
    state, metrics = step(state, sharding.shard_batch(_batch(), mesh, rules))
    losses.append(float(metrics["loss"]))
  eval_fn = sharding.jit_eval_step(make_eval_step(model), shardings, mesh, rules)
  batch = sharding.shard_batch(_batch(), mesh, rules)
  eval_sum = float(eval_fn(state.variables, batch)["loss_sum"])
  return Run(np.array(losses), jax.device_get(state.params), state, len(traces), eval_sum)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"d{m.data}f{m.fsdp}t{m.tensor}")
@pytest.mark.slow
def test_sharded_training_matches_single_device(mesh):
  run, ref = _run(mesh), _run(SINGLE)
  assert ref.losses[-1] < ref.losses[0] - 0.1  # it trains
  np.testing.assert_allclose(run.losses, ref.losses, rtol=LOSS_RTOL)
  chex.assert_trees_all_close(run.params, ref.params, rtol=0, atol=PARAM_ATOL)
  np.testing.assert_allclose(run.eval_sum, ref.eval_sum, rtol=LOSS_RTOL)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"d{m.data}f{m.fsdp}t{m.tensor}")
def test_second_call_does_not_recompile(mesh):
  assert _run(mesh).traces == 1  # STEPS calls, one trace and so one compilation


def test_grad_accumulation_under_sharding_matches_one_big_batch():
  accumulated, whole = _run(ALL3, grad_accum_steps=2), _run(ALL3)
  np.testing.assert_allclose(accumulated.losses, whole.losses, rtol=LOSS_RTOL)
  chex.assert_trees_all_close(accumulated.params, whole.params, rtol=0, atol=PARAM_ATOL)


def test_create_sharded_state_matches_single_device_init():
  config = _config(ALL3)
  model, tx, _, precision = _model(config)
  state, shardings = create_sharded_state(model, tx, config, _mesh(ALL3), jax.random.key(0))
  ref = _initial_state()
  chex.assert_trees_all_equal(
    jax.device_get((state.params, state.opt_state)), jax.device_get((ref.params, ref.opt_state))
  )
  np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(ref.rng))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, state), shardings)


def test_param_and_optimizer_shardings_follow_the_rules():
  state = _run(ALL3).state
  params = state.params
  block = params["decoder"]["blocks_0"]
  assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert block["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert block["attn"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)  # kv_heads
  assert block["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert block["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")  # (mlp, embed)
  assert params["final_norm"]["scale"].sharding.spec == P("fsdp")
  assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")  # (embed, vocab)
  adam = state.opt_state[-1][0]  # the ScaleByAdamState of the chain
  chex.assert_trees_all_equal(
    jax.tree.map(lambda x: x.sharding, adam.mu), jax.tree.map(lambda x: x.sharding, params)
  )
  for replicated in (adam.count, state.step, state.rng, state.skipped_steps):
    assert replicated.sharding.is_fully_replicated


def test_activation_constraints_reach_the_jitted_step():
  config = _config(ALL3)
  model, tx, schedule, _ = _model(config)
  mesh, abstract = _mesh(ALL3), _abstract(config)
  step = sharding.jit_train_step(
    make_train_step(model, tx, schedule, config), jax.tree.map(lambda x: x.sharding, abstract), mesh
  )
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
  hlo = step.lower(abstract, batch).as_text()
  # (batch, length, embed): the residual stream; (batch, length, heads, kv): the
  # queries; (batch, length, mlp): the MLP hidden units.
  for spec in (
    '[{"data", "fsdp"}, {}, {}]',
    '[{"data", "fsdp"}, {}, {"tensor"}, {}]',
    '[{"data", "fsdp"}, {}, {"tensor"}]',
  ):
    assert re.search(rf"sharding_constraint %\S+ <@mesh, {re.escape(spec)}>", hlo), spec


def test_scanned_moe_shardings_follow_the_rules():
  abstract = _abstract(_config(ALL3, scan_layers=True, n_experts=4, expert_top_k=2))
  block = abstract.params["decoder"]["blocks"]["block"]
  # "layers" (the scan axis) stays whole; "expert" takes "tensor" before "mlp" can.
  assert block["mlp"]["w_in"].sharding.spec == P(None, "tensor", "fsdp", None)
  assert block["attn"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)


def test_rules_override_from_config_takes_precedence():
  config = _config(MeshConfig(data=1, fsdp=8, rules=(("embed", None),)))
  assert sharding.logical_rules(config.mesh)[0] == ("embed", None)
  assert _abstract(config).params["final_norm"]["scale"].sharding.is_fully_replicated


def test_fsdp_divides_per_device_state_memory():
  replicated = sharding.state_memory_report(_run(MeshConfig(data=8)).state)
  fsdp = sharding.state_memory_report(_run(MeshConfig(data=1, fsdp=8)).state)
  assert replicated["total_bytes"] == replicated["unsharded_bytes"] == fsdp["unsharded_bytes"]
  # Every llama parameter has an "embed" axis; only the int32 step counts stay whole.
  assert fsdp["params_bytes"] * 8 == replicated["params_bytes"]
  assert fsdp["total_bytes"] < replicated["total_bytes"] / 8 + 64
  assert sharding.state_memory_report(_abstract(_config(MeshConfig(data=1, fsdp=8)))) == fsdp


@pytest.mark.parametrize(
  "mesh,needle",
  [
    (MeshConfig(data=3), "data=3, fsdp=1, tensor=1 has 3 devices, but there are 8"),
    (MeshConfig(data=-1, tensor=3), "3 does not divide the 8 devices"),
  ],
)
def test_bad_mesh_sizes_are_rejected(mesh, needle):
  with pytest.raises(ValueError, match=needle):
    sharding.make_mesh(mesh)


@pytest.mark.parametrize(
  "mesh,model_kw,fields",
  [
    (
      MeshConfig(data=2, tensor=4),
      dict(n_heads=2, n_kv_heads=None),
      ["mesh tensor=4 does not divide model.n_heads=2", "model.n_kv_heads=2"],
    ),
    (MeshConfig(data=2, tensor=4), dict(d_ff=66), ["model.d_ff=66"]),
    (
      MeshConfig(data=1, tensor=8),
      dict(n_heads=8, n_kv_heads=8, vocab_size=60),
      ["model.vocab_size=60"],
    ),
    (
      MeshConfig(data=1, fsdp=8),
      dict(d_model=36, n_heads=2, n_kv_heads=2),
      ["mesh fsdp=8 does not divide model.d_model=36"],
    ),
  ],
)
def test_indivisible_model_dims_name_the_field(mesh, model_kw, fields):
  with pytest.raises(ValueError) as err:
    _abstract(_config(mesh, **model_kw))
  for field in fields:
    assert field in str(err.value)


def test_shard_batch_splits_rows_and_rejects_an_indivisible_batch():
  mesh = _mesh(MeshConfig(data=8))
  with pytest.raises(ValueError, match="train.batch_size a multiple of 8"):
    sharding.shard_batch({"inputs": np.zeros((12, T), np.int32)}, mesh)
  out = sharding.shard_batch(_batch(), mesh)
  assert out["inputs"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(out["targets"]), _batch()["targets"])


def test_distributed_init_needs_all_or_none_of_the_env_vars(monkeypatch):
  for name in sharding.DISTRIBUTED_ENV:
    monkeypatch.delenv(name, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    sharding.maybe_initialize_distributed()


def _two_process_worker(out_dir):
  """One of two processes (4 CPU devices each) training on the 8-device ALL3 mesh."""
  assert sharding.maybe_initialize_distributed()
  config = _config(ALL3)
  model, tx, schedule, precision = _model(config)
  mesh, rules = sharding.make_mesh(ALL3), sharding.logical_rules(ALL3)
  state, shardings = create_sharded_state(model, tx, config, mesh, jax.random.key(0))
  step = sharding.jit_train_step(
    make_train_step(model, tx, schedule, config), shardings, mesh, rules
  )
  rows = B // jax.process_count()  # this process's rows of the global batch
  local = {k: v[jax.process_index() * rows :][:rows] for k, v in _batch().items()}
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, sharding.shard_batch(local, mesh, rules))
    losses.append(float(metrics["loss"]))
  manager = checkpoint.make_manager(os.path.join(out_dir, "checkpoints"))
  checkpoint.save(manager, STEPS, state, {"losses": losses})
  checkpoint.wait(manager)


@pytest.mark.slow  # two fresh processes
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {
    **os.environ,
    "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
    "JAX_NUM_PROCESSES": "2",
    "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  }
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, str(tmp_path)],
      env={**env, "JAX_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  ref = _run(ALL3)
  state, data_state, step = checkpoint.restore_latest(
    str(tmp_path / "checkpoints"), _abstract(_config(ALL3))
  )
  assert step == STEPS
  np.testing.assert_allclose(data_state["losses"], ref.losses, rtol=LOSS_RTOL)
  chex.assert_trees_all_close(jax.device_get(state.params), ref.params, rtol=0, atol=PARAM_ATOL)


if __name__ == "__main__":
  _two_process_worker(sys.argv[1])
