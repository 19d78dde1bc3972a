"""The notebooks are stored with the outputs of a full run top to bottom (a reader sees
them without running anything; ``python notebooks/run_all.py`` refreshes them), and run
top to bottom with their fast settings (LLM_MP_NOTEBOOK_FAST=1) without writing anything."""

import hashlib
import os
import runpy

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
# The runner that stores the outputs (run_path: no bytecode cache written beside it).
run_all = runpy.run_path(os.path.join(NOTEBOOK_DIR, "run_all.py"))
NOTEBOOKS = run_all["notebooks"]()
PLOTS = {"01_quickstart.ipynb", "02_mixed_precision.ipynb"}  # notebooks that draw figures


def test_there_are_notebooks():
  assert NOTEBOOKS[:2] == ["01_quickstart.ipynb", "02_mixed_precision.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_with_the_outputs_of_one_run(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  # Every cell ran, once, in order, in one kernel: `python notebooks/run_all.py NAME`.
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
    f"{name}: re-execute with notebooks/run_all.py"
  )
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"], f"{name}: stored with an error"
  if name in PLOTS:
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure stored"
  assert ROOT not in nbformat.writes(nb), f"{name}: an output names this checkout's path"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_fast_settings(name, monkeypatch):
  # The kernel inherits this environment: fast settings, this checkout's llm_mp first on the
  # path, a single CPU device (not the 8 fake ones of conftest: one core-sized run is faster).
  monkeypatch.setenv("LLM_MP_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(
    "XLA_FLAGS", os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  )
  monkeypatch.setenv("MPLBACKEND", "Agg")
  path = os.path.join(NOTEBOOK_DIR, name)
  before = _digests()
  nb = run_all["execute"](nbformat.read(path, as_version=4), timeout=300)  # in memory only
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert _digests() == before, "a notebook wrote into the repository"


def _digests():
  """``{path under notebooks/: sha256}`` of every file there."""
  out = {}
  for folder, _, files in os.walk(NOTEBOOK_DIR):
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), NOTEBOOK_DIR)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return out
