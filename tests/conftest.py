"""Test setup: 8 fake CPU devices for sharding tests and a quicker compiler setting, set
before jax is imported, one persistent compilation cache and one embedded-corpus cache
for the whole run, and one device for every test not marked ``multidevice``."""

import os
import shutil
import tempfile

# The tests compile thousands of small programs whose run time is tiny next to their compile
# time, and compiling is most of the suite's CPU time. LLVM's optimisation passes are skipped
# (backend optimisation level 0: about a third off the suite's CPU time), and fusions are
# emitted by XLA's older loop emitters instead of its MLIR fusion emitters (about a third
# off what is left). XLA's own (HLO) passes still run and there is no fast math; results
# agree with the default setting's to fp32 rounding. Every process of the run (xdist
# workers, notebook kernels, CLI subprocesses) inherits these flags.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _FLAGS:
  _FLAGS += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _FLAGS:
  _FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny programs; a persistent cache lets later ones load the
# executable instead of compiling it again. It is set in the environment before jax is
# imported, so the pytest-xdist workers (started by this process), the notebook kernels and
# the CLI subprocesses of the tests all read and fill the same one. A size limit turns on
# jax's file lock, so one process never reads an entry that another is still writing.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llm_mp_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

# The embedded corpus is parsed from the standard library once for the whole run, not once
# per process: the first process to need it writes the cache file that the others read.
_OWN_DATA_CACHE = "LLM_MP_CACHE" not in os.environ
if _OWN_DATA_CACHE:
  os.environ["LLM_MP_CACHE"] = tempfile.mkdtemp(prefix="llm_mp_cache_")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


def pytest_unconfigure(config):
  # The process that made the caches (the xdist controller, or the only process) removes them.
  if not hasattr(config, "workerinput"):
    for own, name in ((_OWN_CACHE, "JAX_COMPILATION_CACHE_DIR"), (_OWN_DATA_CACHE, "LLM_MP_CACHE")):
      if own:
        shutil.rmtree(os.environ[name], ignore_errors=True)


def pytest_collection_modifyitems(items):
  # Files with slow tests first (each keeps its order): pytest-xdist's loadfile hands out
  # files in this order, so the long ones start early instead of ending the run on one worker.
  slow_files = {item.path for item in items if "slow" in item.keywords}
  items.sort(key=lambda item: item.path not in slow_files)


_ALL_DEVICES = jax.devices


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Outside tests marked ``multidevice``, ``jax.devices()`` is the first CPU device only, so
  the default mesh (``mesh.data=-1``: every device) has one device. Splitting a test's tiny
  batches 8 ways on 2 cores only adds work: about a third of the suite's CPU time. The
  tests that check sharding (same numbers on 1 device or 8, shardings that follow the
  rules, restoring onto another mesh) are marked and see all 8. The view holds for the
  whole protocol, so module- and session-scoped fixtures made in a test's setup see the
  devices that test sees."""
  if item.get_closest_marker("multidevice") is None:
    first = _ALL_DEVICES()[:1]
    jax.devices = lambda backend=None: _ALL_DEVICES(backend)[:1] if backend else first
  try:
    return (yield)
  finally:
    jax.devices = _ALL_DEVICES
