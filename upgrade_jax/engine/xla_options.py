"""XLA compiler options for the engine's jitted programs, per backend.

On XLA:CPU the train step, validation and prediction compile without
YNNPACK's fusions, so convolutions run as Eigen's. Measured on 2-core AMD EPYC
machines (BUILD_NOTES.md, "XLA:CPU without YNNPACK, for training too"): the
train step 14-22 % faster (Zen 2, quiet), the eval forward 1.1-1.3x faster at
256² and equal at 1024² (Zen 2 and an AVX-512 EPYC). YNNPACK's fusions spend
less CPU but leave a core idle; under heavy load from other processes they
did better on an Intel Sapphire Rapids host (issue 4). Outputs differ by
float32 summation order only.

A user who sets `xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps
that choice: these options are then not applied. Other backends get none.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

__all__ = ["CPU_OPTIONS", "compiler_options", "jit"]


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib knows CPU_OPTIONS (XLA flags come and go)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # noqa: BLE001 -- an unknown option fails in XLA, type varies
    return False
  return True


def compiler_options() -> dict | None:
  """The `compiler_options` for jax.jit on the default backend: CPU_OPTIONS on
  XLA:CPU (unless XLA_FLAGS sets them, or this jaxlib lacks them), else None.

  Call at run time, not import time: it initialises the backend.
  """
  if jax.default_backend() != "cpu":
    return None
  if any(k in os.environ.get("XLA_FLAGS", "") for k in CPU_OPTIONS):
    return None
  return dict(CPU_OPTIONS) if _cpu_options_supported() else None


@functools.cache
def _jit(fn, static_argnums, options_items):
  return jax.jit(fn, static_argnums=static_argnums,
                 compiler_options=dict(options_items) if options_items else None)


def jit(fn, static_argnums=()):
  """jax.jit(fn, static_argnums, compiler_options=compiler_options()), one
  jitted object per (fn, options), so its compilation cache lasts the process.
  For module-level functions jitted at their first call rather than at import
  (the backend may not exist yet then)."""
  if isinstance(static_argnums, int):
    static_argnums = (static_argnums,)
  options = compiler_options()
  return _jit(fn, tuple(static_argnums), tuple(sorted(options.items())) if options else None)
