"""engine.xla_options: which compiler options the engine's programs get, that
validation is compiled with them, and that the train step's compile gives
gradients that agree with a float64 oracle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, toy_discs
from upgrade_jax import engine as T
from upgrade_jax import parallel
from upgrade_jax.engine import evaluation, xla_options

TINY = (4, 8, 8, 8, 8)
REPO = Path(__file__).resolve().parents[1]


def test_cpu_gets_the_options_unless_xla_flags_sets_them(monkeypatch):
  assert jax.default_backend() == "cpu"  # the suite runs on XLA:CPU
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
  assert xla_options.compiler_options("train") is None  # see the gradient test below
  # The user's own XLA_FLAGS choice wins: no options of ours on top of it.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_options.compiler_options() is None
  with pytest.raises(ValueError, match="program"):
    xla_options.compiler_options("backward")


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


def test_validation_compiles_without_ynnpack(tiny_run):
  config, ds, mesh, state = tiny_run
  valset = T.make_val_set(config, ds, ds.max_label, mesh)
  counts = xla_options.jit(evaluation._eval_counts, static_argnums=0)
  hlo = counts.lower(state.model, state.variables, valset).compile().as_text()
  assert "ynn_fusion" not in hlo
  # The same Dice as the default compile (YNNPACK's fusions, where it has them).
  ref = jax.jit(evaluation._eval_counts, static_argnums=0)(state.model, state.variables, valset)
  np.testing.assert_array_equal(counts(state.model, state.variables, valset), ref)


# Run with XLA's default flags, not the suite's -O0 (conftest.TEST_XLA_FLAGS):
# this test is about the train step's compile as users get it, and -O0's
# sequential float32 reductions alone reach 1e-3 here.
_GRADIENT_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from upgrade_jax import engine as T
from upgrade_jax.engine import xla_options
from upgrade_jax.losses import dice_loss_from_logits
from upgrade_jax.models.unet import UNet

model = UNet(widths=(16, 32, 64, 128, 128))
variables = T.init_variables(model, 2, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 64, 64, 2))
target = jnp.asarray(rng.random((8, 64, 64)) > 0.7)

def grad_fn(dtype, options):
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
  bs, xs = cast(variables["batch_stats"]), jnp.asarray(x, dtype)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": bs}, xs, train=True,
                            mutable=["batch_stats"])
    return dice_loss_from_logits(logits, target)
  return jax.jit(jax.grad(loss), compiler_options=options)(cast(variables["params"]))

ours = grad_fn(jnp.float32, xla_options.compiler_options("train"))
with jax.enable_x64(True):
  ref = jax.device_get(grad_fn(jnp.float64, None))
errs = {}
for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(ours)):
  r = np.asarray(r)
  errs[jax.tree_util.keystr(path)] = float(np.abs(np.asarray(g, np.float64) - r).max()
                                           / np.abs(r).max())
print(json.dumps(errs))
"""


@pytest.mark.slow
def test_train_compile_gradients_match_float64():
  # The UNet's loss gradient compiled as the train step compiles it, against
  # the same function in float64. The shape matters: XLA:CPU without YNNPACK
  # (jaxlib 0.10.2) is off by 8.6e-2 relative here and exact at batch 2.
  flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
  env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", _GRADIENT_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(errs) > 40
  for path, err in errs.items():
    # 1e-3: float32 rounding on this AMD EPYC reaches 2.3e-4 on a BatchNorm bias
    # (2026-12-06); the defect this guards is 8.6e-2.
    assert err < 1e-3, (path, err)
