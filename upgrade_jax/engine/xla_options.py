"""XLA compiler options for the engine's jitted programs, per backend and program.

Forward-only programs (prediction, tiling, validation) on XLA:CPU compile
without YNNPACK's fusions, so convolutions run as Eigen's: 1.1-1.3x faster at
256² and equal at 1024² on 2-core AMD EPYC machines (BUILD_NOTES.md,
performance), outputs within 1e-6 of the default compile and
2.4e-7 of PyTorch's.

The train step keeps XLA's default (YNNPACK on). Without YNNPACK it ran 14-22 %
faster on the Zen 2, but jaxlib 0.10.2 then computes wrong gradients for the
UNet at batch >= 4: against a float64 oracle, relative error 4e-4 at batch 4
and 8.6e-2 at batch 8 (64², widths 16..128), where the default compile is
within 1e-5; single convolutions are exact either way. The quickstart's
upgrade network then never validated above 0.59 Dice (BUILD_NOTES.md,
performance). tests/test_xla_options.py holds
the oracle.

A user who sets `xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps
that choice: these options are then not applied. Other backends get none.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

__all__ = ["CPU_OPTIONS", "PROGRAMS", "compiler_options", "jit"]


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib knows CPU_OPTIONS (XLA flags come and go)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # noqa: BLE001 -- an unknown option fails in XLA, type varies
    return False
  return True


PROGRAMS = ("forward", "train")


def compiler_options(program: str = "forward") -> dict | None:
  """The `compiler_options` for jax.jit of a `program` on the default backend:
  for "forward", CPU_OPTIONS on XLA:CPU (unless XLA_FLAGS sets them, or this
  jaxlib lacks them); for "train", and on other backends, None.

  Call at run time, not import time: it initialises the backend.
  """
  if program not in PROGRAMS:
    raise ValueError(f"xla_options program {program!r} unknown; choose one of {PROGRAMS}")
  if program == "train" or jax.default_backend() != "cpu":
    return None
  if any(k in os.environ.get("XLA_FLAGS", "") for k in CPU_OPTIONS):
    return None
  return dict(CPU_OPTIONS) if _cpu_options_supported() else None


@functools.cache
def _jit(fn, static_argnums, options_items):
  return jax.jit(fn, static_argnums=static_argnums,
                 compiler_options=dict(options_items) if options_items else None)


def jit(fn, static_argnums=()):
  """jax.jit(fn, static_argnums, compiler_options=compiler_options("forward")),
  one jitted object per (fn, options), so its compilation cache lasts the
  process. For module-level forward-only functions, jitted at their first call
  rather than at import (the backend may not exist yet then)."""
  if isinstance(static_argnums, int):
    static_argnums = (static_argnums,)
  options = compiler_options()
  return _jit(fn, tuple(static_argnums), tuple(sorted(options.items())) if options else None)
