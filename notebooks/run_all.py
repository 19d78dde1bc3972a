"""Re-executes the notebooks in place, so that the outputs stored with them are current.

  python notebooks/run_all.py                        # every notebook, full settings
  python notebooks/run_all.py 02_mixed_precision     # the ones named
  LLM_MP_NOTEBOOK_FAST=1 python notebooks/run_all.py # CI's tiny settings (not for committing)

Each notebook runs top to bottom in a fresh ``python3`` kernel (nbclient) whose working
directory is ``notebooks/`` and which imports the llm_mp of this checkout (its root first on
``PYTHONPATH``); the runs the notebooks train go to temporary directories. The executed
notebook, figures included, is written back over the file. ``tests/test_notebooks.py``
executes the same way, in memory, without writing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def notebooks() -> list[str]:
  """The file names of the notebooks, sorted."""
  return sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
  """Runs every cell of ``nb`` in a new kernel (the outputs land in ``nb``); returns it.

  The kernel inherits this process's environment. Raises ``CellExecutionError``
  naming the first failing cell.
  """
  client = nbclient.NotebookClient(
    nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
  )
  client.execute()
  return nb


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
  args = parser.parse_args(argv)
  names = [n if n.endswith(".ipynb") else n + ".ipynb" for n in args.names] or notebooks()
  unknown = sorted(set(names) - set(notebooks()))
  if unknown:
    parser.error(f"no such notebook(s) in {HERE}: {', '.join(unknown)}")
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  # tqdm's notice that ipywidgets is absent (it falls back to its text bar) would be stored
  # with this machine's site-packages path in it.
  warn = [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]
  os.environ["PYTHONWARNINGS"] = ",".join(filter(None, warn))
  for name in names:
    path = os.path.join(HERE, name)
    t0 = time.perf_counter()
    nb = execute(nbformat.read(path, as_version=4))
    nbformat.write(nb, path)
    print(f"{name}: executed in {time.perf_counter() - t0:.0f} s, written", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
