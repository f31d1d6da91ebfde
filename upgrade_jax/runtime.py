"""Process-level tuning for CPU runs, called by entry points before jax loads.

XLA:CPU allocates its large temporaries afresh at every execution. glibc serves
blocks above its mmap threshold (at most 32 MB) with mmap and unmaps them on
free, so every train step page-faults them in again: 30-57 k minor faults and
~50 ms of system time per step on this project's 2-core machine. Keeping them
in the heap removes the faults (-10 % step time; BUILD_NOTES.md, performance).
"""

from __future__ import annotations

import ctypes
import os


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


def prepare_cpu_benchmark(*, omp_wait_policy: str = "auto", xla_flags: str = "",
                          malloc_tuning: bool = True, threads: int | None = None) -> dict:
  """Process settings for a JAX-vs-PyTorch CPU benchmark; call before jax/torch load.

  Args:
    omp_wait_policy: libgomp's OMP_WAIT_POLICY for PyTorch ("auto": passive
      when the 1-minute load is above 1, since spinning threads then steal
      the cores the other library needs; else active).
    xla_flags: appended to XLA_FLAGS.
    malloc_tuning: apply `tune_malloc`.
    threads: pin the process to this many cores (XLA:CPU sizes its pool
      from the affinity mask); None keeps them all.

  Returns:
    {"omp_wait_policy", "malloc_tuned"}: what was applied.
  """
  policy = (("passive" if os.getloadavg()[0] > 1.0 else "active")
            if omp_wait_policy == "auto" else omp_wait_policy)
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())  # libgomp reads it when torch loads
  tuned = tune_malloc() if malloc_tuning else False
  if threads is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  return {"omp_wait_policy": policy, "malloc_tuned": tuned}
