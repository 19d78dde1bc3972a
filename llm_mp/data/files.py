"""What every data module shares: the error type and atomic file writes."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


class DataError(ValueError):
  """A corpus, tokenizer or token-file problem, with a one-line message naming the path."""


def write_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
  """Creates ``path`` with ``write(file)`` so readers never see a partial file.

  The data go to a temporary file in the same directory, which then replaces
  ``path`` with ``os.replace``; on error the temporary file is removed. The file
  gets the mode a plain ``open`` gives (0644 under the usual umask 022), not the
  temporary file's 0600.
  """
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  umask = os.umask(0)
  os.umask(umask)
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~umask)
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
