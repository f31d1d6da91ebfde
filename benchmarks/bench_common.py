"""What the JAX-vs-PyTorch CPU benchmarks share (benchmark-only, not the library).

  prepare_cpu_benchmark   process settings, before jax or torch load
  load_torch              PyTorch with the benchmark's thread count, or None
"""

from __future__ import annotations

import os
import sys

from upgrade_jax.runtime import tune_malloc  # no jax import: safe before jax


def prepare_cpu_benchmark(*, omp_wait_policy: str = "auto", xla_flags: str = "",
                          malloc_tuning: bool = True, threads: int | None = None) -> dict:
  """Process settings for a JAX-vs-PyTorch CPU benchmark; call before jax/torch load.

  Args:
    omp_wait_policy: libgomp's OMP_WAIT_POLICY for PyTorch. "auto" is
      passive: the benchmarks alternate JAX and PyTorch in one process, and
      actively waiting OpenMP threads spin through JAX's turn on the same
      cores (train step w16: JAX 382 ms under "active" vs 231 "passive",
      PyTorch 157 vs 162; BUILD_NOTES.md). Before, "auto" was
      active on a machine with load <= 1, which was never the fair choice.
    xla_flags: appended to XLA_FLAGS.
    malloc_tuning: apply `tune_malloc`.
    threads: pin the process to this many cores (XLA:CPU sizes its pool
      from the affinity mask); None keeps them all.

  Returns:
    {"omp_wait_policy", "malloc_tuned"}: what was applied.
  """
  policy = "passive" if omp_wait_policy == "auto" else omp_wait_policy
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())  # libgomp reads it when torch loads
  tuned = tune_malloc() if malloc_tuning else False
  if threads is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  return {"omp_wait_policy": policy, "malloc_tuned": tuned}


def load_torch(threads: int, *, disabled: bool, who: str):
  """torch with `threads` intra-op threads, or None (disabled or not installed:
  the benchmark then reports null torch fields)."""
  if disabled:
    return None
  try:
    import torch
  except ImportError:
    print(f"{who}: PyTorch is not installed (pip install '.[bench]'); torch fields are null",
          file=sys.stderr)
    return None
  torch.set_num_threads(threads)
  return torch
