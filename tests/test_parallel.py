"""Data parallelism: 8 simulated CPU devices follow the 1-device trajectory.

Runs in a subprocess because the device count is fixed when JAX starts:
XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before the
import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {tests!r})
import numpy as np, jax
from conftest import toy_discs
from upgrade_jax import parallel
from upgrade_jax import engine as T
from upgrade_jax.perturb import PerturbConfig

assert jax.device_count() == 8, jax.devices()
out = sys.argv[1]
cfg = T.TrainConfig(task=T.Upgrade(perturb=PerturbConfig(omission_rate=0.5, bias_max=2,
                                                         salt_pepper_prob=0.02)),
                    widths=(4, 8, 8, 8, 8), crop=32, batch_size=16, eval_batch_size=8)
train = toy_discs(8, size=(40, 40), seed=0,
                  extents=[(40, 40), (36, 40), (40, 33), (40, 40)] * 2)
val = toy_discs(5, size=(40, 40), seed=1)
max_label = max(train.max_label, val.max_label)
res = {{}}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
  mesh = parallel.make_mesh(devices)
  state = T.create_train_state(cfg, 2, jax.random.PRNGKey(0), mesh)
  data = parallel.place_dataset(train, mesh)
  step = T.make_train_step(cfg, mesh, max_label)
  if name == "eight":
    hlo = step.lower(state, data).compile().as_text()
    res["conv_batches"] = sorted({{int(l.split("f32[")[1].split(",")[0])
                                 for l in hlo.splitlines()
                                 if " convolution(" in l and "size=3x3 " in l}})
    res["all_reduces"] = hlo.count("all-reduce(")
  losses = []
  for _ in range(6):
    state, m = step(state, data)
    losses.append(m["loss"])
  res[name + "_losses"] = [float(x) for x in jax.device_get(losses)]
  res[name + "_param_sharding"] = str(jax.tree.leaves(state.params)[0].sharding.spec)
  valset = T.make_val_set(cfg, val, max_label, mesh)
  res[name + "_val_batch_shards"] = len(valset.inputs.addressable_shards)
  res[name + "_val_dice"] = T.evaluate(state, valset)
  lq = val.targets > 0
  res[name + "_pred"] = T.predict(state, val.images, lq, batch_size=8).tolist()
  np.savez(os.path.join(out, name + ".npz"), *[np.asarray(x) for x in
                                  jax.tree.leaves((state.params, state.batch_stats))])

# The three placements of a training set on 8 devices (7 samples: the
# sharded set is padded to 8): the same losses and parameters, bit for bit.
mesh = parallel.make_mesh()
seven = train.subset(list(range(7)))
placed = {{}}
for name in ("replicate", "shard", "stream"):
  state = T.create_train_state(cfg, 2, jax.random.PRNGKey(0), mesh)
  step = T.make_train_step(cfg, mesh, max_label, streamed=name == "stream")
  data = parallel.place_dataset(seven, mesh, shard=name == "shard")
  if name == "shard":
    res["shard_local_samples"] = sorted({{s.data.shape[0] for s in data.images.addressable_shards}})
  rng = np.asarray(state.rng)
  losses = []
  for s in range(3):   # bit-identity: three steps show it as well as six
    if name == "stream":
      idx = np.asarray(T.draw_indices(rng, s, 7, cfg.batch_size))
      data = parallel.put_batch(seven, idx, mesh)
    state, m = step(state, data)
    losses.append(float(m["loss"]))
  placed[name] = (losses, [np.asarray(x) for x in jax.tree.leaves(state.params)])
res["placements_equal"] = {{
    name: placed[name][0] == placed["replicate"][0] and all(
        np.array_equal(a, b) for a, b in zip(placed[name][1], placed["replicate"][1]))
    for name in ("shard", "stream")}}
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("parallel")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT.format(tests=str(REPO / "tests")), str(tmp)],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["one_vars"] = np.load(tmp / "one.npz")
  res["eight_vars"] = np.load(tmp / "eight.npz")
  return res


@pytest.mark.slow
def test_eight_devices_follow_one_device_trajectory(result):
  one, eight = result["one_losses"], result["eight_losses"]
  assert len(one) == 6 and one[-1] < one[0]  # it is training
  # Same global batch, same keys: only the order of float reductions differs
  # (measured: 9e-7 relative on 2026-11-24).
  np.testing.assert_allclose(eight, one, rtol=5e-5)
  a, b = result["one_vars"], result["eight_vars"]
  assert len(a.files) > 40
  # Parameters, then BatchNorm running statistics. Adam divides by sqrt(v),
  # so an element with a near-zero gradient can move by up to ~lr = 1e-3 per
  # step on reduction-order noise alone: over 6 steps the bound is 6e-3
  # (measured max 2.3e-4 with flax's BatchNorm, 1.1e-3 with the fused
  # BatchNorm+ReLU, whose one-pass statistics round differently). The mean
  # difference below is the tight check.
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=6e-3, err_msg=k)
  # Mean |difference| against the size of one Adam step (lr = 1e-3): measured
  # 6.8e-6 with flax's BatchNorm and 4.6e-5 with the fused BatchNorm+ReLU and
  # mask-gradient max-pool (2026-11-24); a real divergence would be >= 1e-3.
  mean_diff = np.mean([np.mean(np.abs(a[k] - b[k])) for k in a.files])
  assert mean_diff < 1e-4


@pytest.mark.slow
def test_step_is_partitioned_over_the_data_axis(result):
  # Every 3x3 convolution (forward and input gradient; the weight gradients
  # are laid out differently) runs on the per-device batch 16 / 8 = 2 ...
  assert result["conv_batches"] == [2]
  # ... and gradients / BatchNorm statistics are all-reduced across devices.
  assert result["all_reduces"] >= 1
  assert result["eight_param_sharding"] == "P()"  # replicated
  assert result["eight_val_batch_shards"] == 8


@pytest.mark.slow
def test_eval_and_predict_agree_across_device_counts(result):
  assert result["eight_val_dice"] == pytest.approx(result["one_val_dice"], abs=2e-3)
  p1, p8 = np.array(result["one_pred"]), np.array(result["eight_pred"])
  assert p1.shape == (5, 40, 40)
  assert np.mean(p1 != p8) < 1e-3


@pytest.mark.slow
def test_sharded_and_streamed_sets_train_exactly_as_replicated(result):
  # 7 samples over 8 devices: one (or the padding) a device, never gathered
  # whole; the step's gather is partitioned, and the draws are the same.
  assert result["shard_local_samples"] == [1]
  assert result["placements_equal"] == {"shard": True, "stream": True}


def test_labels_are_placed_in_the_smallest_signed_type():
  from upgrade_jax import parallel
  z = np.zeros((2, 3), np.int32)
  assert parallel.label_dtype(z, z + 127) == np.int8
  assert parallel.label_dtype(z - 2, z + 5) == np.int8     # the methods' negative codes
  assert parallel.label_dtype(z, z + 128) == np.int16
  assert parallel.label_dtype(z, z + 70000) == np.int32
  with pytest.raises(ValueError, match="int32"):
    parallel.label_dtype(np.array([2 ** 40]))
  sys.path.insert(0, str(REPO / "tests"))
  from conftest import toy_discs
  ds = toy_discs(3, (16, 16))
  data = parallel.place_dataset(ds, parallel.make_mesh())
  assert data.targets.dtype == np.int8 and data.images.dtype == np.float32
  assert parallel.bytes_per_pixel(data) == 4 + 1 + 1   # was 4 + 4 + 4
  np.testing.assert_array_equal(np.asarray(data.targets), ds.targets)
