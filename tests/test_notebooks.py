"""The notebooks run top to bottom with their fast settings (LLM_MP_NOTEBOOK_FAST=1)
and are stored without outputs."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS[:2] == ["01_quickstart.ipynb", "02_mixed_precision.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_fast_settings(name, monkeypatch):
  # The kernel inherits this environment: fast settings, this checkout's llm_mp first on the
  # path, a single CPU device (not the 8 fake ones of conftest: one core-sized run is faster).
  monkeypatch.setenv("LLM_MP_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert not any(
    f for f in os.listdir(os.path.join(ROOT, "notebooks")) if not f.endswith(".ipynb")
  ), "a notebook wrote into the repository"
