"""Checkpoints: resharding restore, data state, fallback from corrupt saves, keep-N.

The state under test is a real TrainState layout (pure_bf16 params and
moments, a dynamic loss scale, int32 counters, a PRNG key) filled with random
values, so every leaf checks something and nothing needs compiling.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from llm_mp import checkpoint, sharding
from llm_mp.builder import build_recipe
from llm_mp.config import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  PrecisionConfig,
  TrainConfig,
)
from llm_mp.state import abstract_train_state

pytestmark = pytest.mark.multidevice  # meshes of 2 to 8 devices

# After a failed read, tensorstore's cancelled reads call back into orbax's closed event
# loop ("Event loop is closed"); pytest reports those as unraisable exceptions.
TENSORSTORE_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
DATA_STATE = {"epoch": 2, "position": 1234, "files": ["a.txt", "b.jsonl"], "rng": {"seed": 7}}


def _abstract(mesh_cfg, devices):
  config = Config(
    model=ModelConfig.llama(
      vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=16
    ),
    optim=OptimConfig(),
    data=DataConfig(seq_len=16),
    mesh=mesh_cfg,
    train=TrainConfig(steps=10),
    precision=PrecisionConfig(policy="pure_bf16", loss_scale="dynamic"),
  )
  r = build_recipe(config)
  return abstract_train_state(
    r.model, r.tx, config, sharding.make_mesh(mesh_cfg, devices), jax.random.key(0)
  )


def _random_state(abstract, seed):
  rng = np.random.default_rng(seed)

  def fill(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(jax.random.key(seed), x.sharding)
    if np.issubdtype(x.dtype, np.integer):
      return jax.device_put(rng.integers(0, 1000, x.shape).astype(x.dtype), x.sharding)
    return jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding)

  return jax.tree.map(fill, abstract)


def _host(state):
  """NumPy leaves (keys as their key data), for bitwise comparison."""
  return jax.device_get(
    jax.tree.map(
      lambda x: (
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
      ),
      state,
    )
  )


def _assert_bitwise_equal(a, b):
  """Same tree, dtypes, shapes and bytes (``a``, ``b``: device or :func:`_host` trees)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
    assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


@pytest.fixture(scope="module")
def fsdp8():
  return _abstract(MeshConfig(data=1, fsdp=8), jax.devices())


def _saved(directory, abstract, steps, keep=3):
  """A manager with ``steps`` saved (and written); returns it and the states by step."""
  manager = checkpoint.make_manager(str(directory), keep=keep)
  states = {}
  for step in steps:
    states[step] = _random_state(abstract, step)
    assert checkpoint.save(manager, step, states[step], {**DATA_STATE, "step": step}, force=True)
  checkpoint.wait(manager)
  return manager, states


def test_save_on_fsdp8_restores_bitwise_on_2_devices_and_1(fsdp8, tmp_path):
  _, states = _saved(tmp_path, fsdp8, [5])
  for n in (2, 1):
    target = _abstract(MeshConfig(data=1, fsdp=n), jax.devices()[:n])
    state, data_state, step = checkpoint.restore_latest(str(tmp_path), target)
    assert step == 5 and data_state == {**DATA_STATE, "step": 5}
    _assert_bitwise_equal(state, states[5])
    kernel = state.params["lm_head"]["kernel"]
    assert kernel.sharding == target.params["lm_head"]["kernel"].sharding
    assert len(kernel.sharding.device_set) == n


def test_async_save_is_unaffected_by_donating_the_state_right_after(fsdp8, tmp_path):
  manager = checkpoint.make_manager(str(tmp_path))
  state = _random_state(fsdp8, 0)
  expected = _host(state)
  checkpoint.save(manager, 1, state, DATA_STATE)
  # What the trainer does next: a step that donates (deletes) the saved buffers.
  bump = jax.jit(
    lambda s: s.replace(params=jax.tree.map(lambda p: p + 1, s.params)), donate_argnums=0
  )
  bump(state)
  checkpoint.wait(manager)
  restored, _, _ = checkpoint.restore_latest(manager, fsdp8)
  _assert_bitwise_equal(restored, expected)


def _files(step_dir):
  return sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names)


def _array_files(step_dir):
  # Orbax writes each process's OCDBT data files and may merge them into a second copy;
  # which copy a restore reads is its own affair, so damage every one.
  return [path for path in _files(step_dir) if os.sep + "d" + os.sep in path]


def _truncate_array_files(step_dir):
  for path in _array_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_array_files(step_dir):
  for path in _array_files(step_dir):
    os.remove(path)


def _garbage_everywhere(step_dir):
  for path in _files(step_dir):
    with open(path, "wb") as f:
      f.write(b"garbage")


def _arrays_of_another_save(step_dir):
  # Every file is intact, so orbax and tensorstore restore it: only the fingerprint notices.
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(
    os.path.join(os.path.dirname(step_dir), "10", "state"), os.path.join(step_dir, "state")
  )


@TENSORSTORE_NOISE
@pytest.mark.parametrize(
  "damage",
  [_truncate_array_files, _delete_array_files, _garbage_everywhere, _arrays_of_another_save],
  ids=lambda f: f.__name__.strip("_"),
)
@pytest.mark.slow
def test_corrupt_latest_falls_back_to_previous_with_a_warning(damage, fsdp8, tmp_path):
  manager, states = _saved(tmp_path, fsdp8, [10, 20])
  damage(str(tmp_path / "20"))
  with pytest.warns(UserWarning, match="checkpoint step 20 .* is unreadable"):
    state, data_state, step = checkpoint.restore_latest(manager, fsdp8)
  assert step == 10 and data_state["step"] == 10
  _assert_bitwise_equal(state, states[10])
  # The resumed run saves step 20 again: the unreadable one is replaced.
  new = _random_state(fsdp8, 99)
  checkpoint.save(manager, 20, new, DATA_STATE, force=True)
  checkpoint.wait(manager)
  state, _, step = checkpoint.restore_latest(str(tmp_path), fsdp8)
  assert step == 20
  _assert_bitwise_equal(state, new)


def test_unfinished_save_left_by_a_crash_is_ignored_with_a_warning(fsdp8, tmp_path):
  manager, states = _saved(tmp_path, fsdp8, [10])
  partial = tmp_path / ("30" + checkpoint.TMP_SUFFIX) / "state"
  partial.mkdir(parents=True)
  (partial / "_METADATA").write_text("{")
  with pytest.warns(UserWarning, match="checkpoint step 30 .* never finished"):
    state, _, step = checkpoint.restore_latest(manager, fsdp8)
  assert step == 10
  _assert_bitwise_equal(state, states[10])


@TENSORSTORE_NOISE
def test_no_readable_checkpoint_is_a_clear_error(fsdp8, tmp_path):
  _saved(tmp_path, fsdp8, [1, 2])
  for step in (1, 2):
    _garbage_everywhere(str(tmp_path / str(step)))
  with (
    pytest.warns(UserWarning),
    pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint.*step 2.*step 1"),
  ):
    checkpoint.restore_latest(str(tmp_path), fsdp8)


def test_no_checkpoint_at_all_is_none(fsdp8, tmp_path):
  assert checkpoint.restore_latest(str(tmp_path / "missing"), fsdp8) is None
  assert checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path / "empty")), fsdp8) is None


def test_keeps_the_last_n(fsdp8, tmp_path):
  manager, _ = _saved(tmp_path, fsdp8, [1, 2, 3, 4, 5], keep=2)
  assert list(manager.all_steps()) == [4, 5]
  assert sorted(os.listdir(tmp_path)) == ["4", "5"]
