"""Shared test data: a toy Dataset of bright discs on a noisy background; and
one persistent XLA compilation cache for the whole session: every xdist
worker and every CLI subprocess (the tiny runs share shapes and programs, so
a program compiled in one process is loaded by the others)."""

import os
import tempfile

import jax
import numpy as np
import pytest

from upgrade_jax.data.types import Dataset

# Tiny programs: compiling them is most of the suite's time. LLVM's -O0 for
# XLA:CPU's generated code compiles a tiny CLI run in 60% of the CPU time
# (48.7 -> 29.4 s) and leaves XLA's HLO passes, YNNPACK and the library's
# kernels as they are; benchmarks and user runs keep XLA's default. Set
# before any backend starts, inherited by workers and CLI subprocesses
# (tests that set XLA_FLAGS themselves add TEST_XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# The controller imports this file before it starts the workers, which
# inherit the variable: one cache for all of them.
if "UPGRADE_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["UPGRADE_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="upgrade_jax_xla_")
XLA_CACHE = os.environ["UPGRADE_JAX_TEST_XLA_CACHE"]
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
# Cache every program, however fast it compiled (JAX caches only those over
# 1 s): the tests' many small programs repeat across workers and CLI
# subprocesses (which inherit the variable; the CLI sets the same).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def toy_discs(n: int, size=(48, 48), *, seed: int = 0, discs=(3, 6),
              radius=(4, 7), noise: float = 0.15, extents=None) -> Dataset:
  """n images (size) with 3-5 non-overlapping discs each, instance ids 1..k.

  Image = 0.7 on discs + 0.15 background + Gaussian noise; `others` is zero.
  With `extents` (n, 2), pixels outside a sample's extent are zero padding.
  """
  rng = np.random.default_rng(seed)
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  images = np.zeros((n, h, w, 1), np.float32)
  targets = np.zeros((n, h, w), np.int32)
  ext = np.tile([h, w], (n, 1)) if extents is None else np.asarray(extents)
  for i in range(n):
    k = 0
    for _ in range(50):
      if k >= rng.integers(*discs):
        break
      r = rng.integers(*radius)
      cy, cx = rng.integers(r, ext[i, 0] - r), rng.integers(r, ext[i, 1] - r)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
      grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2
      if np.any(targets[i][grown]):
        continue
      k += 1
      targets[i][disc] = k
    img = 0.15 + 0.7 * (targets[i] > 0) + noise * rng.standard_normal((h, w))
    valid = (yy < ext[i, 0]) & (xx < ext[i, 1])
    images[i, ..., 0] = np.where(valid, img, 0.0)
  return Dataset(images, targets, np.zeros_like(targets), ext.astype(np.int32),
                 tuple(f"toy{i}" for i in range(n)))


# CI installs the napari and export extras and sets this: there, a missing
# extra (or display) fails its tests instead of skipping them.
REQUIRE_EXTRAS = os.environ.get("UPGRADE_JAX_REQUIRE_EXTRAS") == "1"


def require_extra(module: str, why: str = ""):
  """The module, imported; skips the calling test module where it is not
  installed, unless CI requires the extras (REQUIRE_EXTRAS: then it fails)."""
  if REQUIRE_EXTRAS:
    import importlib
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=why or None)


def skip_unless_required(reason: str):
  """pytest.skip, or a failure where CI requires the extras."""
  if REQUIRE_EXTRAS:
    pytest.fail(f"required in CI (UPGRADE_JAX_REQUIRE_EXTRAS=1): {reason}")
  pytest.skip(reason)


def pytest_addoption(parser):
  # napari's pytest plugin is off for the suite (pyproject's addopts): its
  # autouse fixtures would run around every test. tests/test_napari_plugin.py
  # imports its make_napari_viewer fixture, which reads these two options.
  for name in ("--show-napari-viewer", "--save-leaked-object-graph"):
    try:
      parser.addoption(name, action="store_true", default=False,
                       help="napari's test option (tests/test_napari_plugin.py)")
    except ValueError:   # napari's plugin was loaded after all (-p napari)
      pass


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
  # What napari's plugin records and make_napari_viewer's teardown reads
  # (item.rep_setup / rep_call / rep_teardown), kept with the plugin off.
  outcome = yield
  rep = outcome.get_result()
  setattr(item, f"rep_{rep.when}", rep)

