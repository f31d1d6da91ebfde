"""engine.xla_options: which compiler options the engine's programs get, and
that the train step and validation are compiled with them."""

import jax
import numpy as np
import pytest

from conftest import toy_discs
from upgrade_jax import engine as T
from upgrade_jax import parallel
from upgrade_jax.engine import evaluation, xla_options

TINY = (4, 8, 8, 8, 8)


def test_cpu_gets_the_options_unless_xla_flags_sets_them(monkeypatch):
  assert jax.default_backend() == "cpu"  # the suite runs on XLA:CPU
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
  # The user's own XLA_FLAGS choice wins: no options of ours on top of it.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_options.compiler_options() is None


def test_jit_is_one_object_per_function_and_options():
  f = lambda x: x * 2  # noqa: E731
  assert xla_options.jit(f) is xla_options.jit(f)
  assert xla_options.jit(f, static_argnums=0) is xla_options.jit(f, static_argnums=(0,))
  assert xla_options.jit(f) is not xla_options.jit(lambda x: x * 2)


@pytest.fixture(scope="module")
def tiny_run():
  config = T.TrainConfig(task=T.make_task("segment"), widths=TINY, crop=16, batch_size=2,
                         eval_batch_size=2)
  ds = toy_discs(4, size=(16, 16))
  mesh = parallel.make_mesh()
  state = T.create_train_state(config, T.network_channels(config, ds.channels),
                               jax.random.PRNGKey(0), mesh)
  return config, ds, mesh, state


def test_train_step_and_validation_compile_without_ynnpack(tiny_run):
  config, ds, mesh, state = tiny_run
  step = T.make_train_step(config, mesh, ds.max_label)
  hlo = step.lower(state, parallel.place_dataset(ds, mesh)).compile().as_text()
  assert "ynn_fusion" not in hlo
  valset = T.make_val_set(config, ds, ds.max_label, mesh)
  counts = xla_options.jit(evaluation._eval_counts, static_argnums=0)
  hlo = counts.lower(state.model, state.variables, valset).compile().as_text()
  assert "ynn_fusion" not in hlo
  # The same Dice as the default compile (YNNPACK's fusions, where it has them).
  ref = jax.jit(evaluation._eval_counts, static_argnums=0)(state.model, state.variables, valset)
  np.testing.assert_array_equal(counts(state.model, state.variables, valset), ref)
