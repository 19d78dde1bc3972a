"""CPU memory allocator settings for llm_mp's entry points (not applied on import).

On CPU, XLA allocates a compiled step's temporaries as one block per call (44
MiB for the nanogpt_cpu preset). glibc returns blocks above its mmap threshold
(dynamic, at most 32 MiB by default) to the kernel when they are freed, so
every step page-faults the whole block in again: ~11k faults and ~20 ms of
system time per nanogpt_cpu step on 2 cores. :func:`tune_malloc` keeps such
blocks in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own variables
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MALLOC_BYTES = 1 << 30
_malloc_tuned = False


def tune_malloc() -> bool:
  """Raises glibc's mmap and trim thresholds to 1 GiB (``mallopt``), so a
  compiled step's temporary block stays in the heap between steps instead of
  being unmapped and page-faulted in again each step. Call it once at the
  start of a program (the ``llm-mp`` command and the benchmark do; importing
  llm_mp does not). No-op where glibc is absent or the user set the
  ``MALLOC_*`` variables. Returns whether it changed anything.
  """
  global _malloc_tuned  # pylint: disable=global-statement
  if _malloc_tuned or any(k in os.environ for k in MALLOC_ENV):
    return _malloc_tuned
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MALLOC_BYTES)) and bool(
    mallopt(_M_TRIM_THRESHOLD, _MALLOC_BYTES)
  )
  return _malloc_tuned
