"""Process-level tuning for CPU runs, called by entry points before jax loads.

XLA:CPU allocates its large temporaries afresh at every execution. glibc serves
blocks above its mmap threshold (at most 32 MB) with mmap and unmaps them on
free, so every train step page-faults them in again: 30-57 k minor faults and
~50 ms of system time per step on this project's 2-core machine. Keeping them
in the heap removes the faults (-10 % step time; BUILD_NOTES.md).
"""

from __future__ import annotations

import ctypes


def tune_malloc() -> bool:
  """glibc: serve large blocks from the heap, keep freed memory, one arena.

  Call before the allocating threads start (before importing jax or torch).
  Returns False where it does not apply (not glibc); never raises.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  ok = libc.mallopt(m_mmap_max, 0) == 1
  ok &= libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
  ok &= libc.mallopt(m_arena_max, 1) == 1
  return bool(ok)

