"""UNet: parameter shapes, odd sizes, the up-conv, BatchNorm train vs eval."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgrade_jax import engine as T
from upgrade_jax.engine import evaluation as engine_evaluate
from upgrade_jax.engine import state as engine_state
from upgrade_jax.models.unet import (ConvBlock, UNet, UpConv2x2, crop_to,
                                     pad_to_multiple)

WIDTHS = (4, 8, 8, 8, 8)


def _apply(model, variables, x, train=False):
  # Eager: for a model this small, op-by-op dispatch (each op compiled once
  # and cached) is cheaper than compiling the whole graph per input shape.
  return model.apply(variables, x, train=train,
                     mutable=["batch_stats"] if train else False)


@pytest.fixture(scope="module")
def model_and_vars():
  model = UNet(widths=WIDTHS)
  variables = T.init_variables(model, 2, jax.random.PRNGKey(0))
  return model, variables


def test_param_shapes(model_and_vars):
  model, variables = model_and_vars
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["down0"]["Conv_0"]["kernel"] == (3, 3, 2, 4)
  assert shapes["down0"]["Conv_1"]["kernel"] == (3, 3, 4, 4)
  assert shapes["down1"]["Conv_0"]["kernel"] == (3, 3, 4, 8)
  assert shapes["bottleneck"]["Conv_0"]["kernel"] == (3, 3, 8, 8)
  assert shapes["upconv3"] == {"kernel": (2, 2, 8, 8), "bias": (8,)}
  assert shapes["upconv0"] == {"kernel": (2, 2, 8, 4), "bias": (4,)}
  # Decoder block 0 sees skip (4) + up-sampled (4) channels.
  assert shapes["up0"]["Conv_0"]["kernel"] == (3, 3, 8, 4)
  assert shapes["head"] == {"kernel": (1, 1, 4, 2), "bias": (2,)}
  assert "bias" not in shapes["down0"]["Conv_0"]  # BN follows: no conv bias
  assert shapes["down0"]["BatchNorm_0"] == {"scale": (4,), "bias": (4,)}
  assert set(shapes) == {f"down{i}" for i in range(4)} | {
      f"up{i}" for i in range(4)} | {f"upconv{i}" for i in range(4)} | {
          "bottleneck", "head"}


class _Small(nn.Module):
  """One of each parameterised layer of the UNet: cheap to model.init."""

  @nn.compact
  def __call__(self, x):
    x = ConvBlock(16)(x, train=False)
    x = UpConv2x2(8)(x)
    return nn.Conv(2, (1, 1))(x)


def test_init_matches_flax_defaults(model_and_vars):
  """The one-draw initialiser has model.init's structure, its constant
  leaves, and lecun-normal kernel statistics."""
  model, ours = model_and_vars
  ref_shapes = jax.eval_shape(functools.partial(model.init, train=False),
                              jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 2)))
  assert jax.tree.structure(ours) == jax.tree.structure(ref_shapes)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref_shapes)
  small = _Small()
  x = jnp.zeros((1, 8, 8, 3))
  ref = jax.jit(small.init)(jax.random.PRNGKey(1), x)
  mine = engine_state._lecun_like_init(jax.random.PRNGKey(2), jax.eval_shape(
      small.init, jax.random.PRNGKey(1), x))
  assert jax.tree.structure(mine) == jax.tree.structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(mine)[0],
                          jax.tree.leaves(ref)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if path[-1].key != "kernel":
      np.testing.assert_array_equal(a, b)  # ones / zeros as Flax
    else:
      fan_in = np.prod(a.shape[:-1])
      bound = 2 / np.sqrt(fan_in) / 0.8796  # truncated at 2 std
      assert np.abs(a).max() <= bound + 1e-6 and np.abs(b).max() <= bound + 1e-6
  k = np.asarray(ours["params"]["up1"]["Conv_0"]["kernel"])  # 3*3*16 fan-in
  assert abs(k.std() * np.sqrt(3 * 3 * 16) - 1.0) < 0.1


def test_upconv_equals_conv_transpose():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  ref = nn.ConvTranspose(3, (2, 2), strides=(2, 2))
  variables = ref.init(jax.random.PRNGKey(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero bias
  ours = UpConv2x2(3).apply(variables, x)
  assert ours.shape == (2, 10, 14, 3)
  np.testing.assert_allclose(ours, ref.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_pad_and_crop():
  x = jnp.ones((2, 17, 33, 3))
  padded, hw = pad_to_multiple(x, 16)
  assert padded.shape == (2, 32, 48, 3) and hw == (17, 33)
  assert float(padded.sum()) == 2 * 17 * 33 * 3
  np.testing.assert_array_equal(crop_to(padded, hw), x)


@pytest.mark.parametrize("size", [(17, 23), (33, 50), (48, 31)])
def test_odd_sizes_equal_manual_padding(model_and_vars, size):
  """Any H, W: the output equals that of the zero-padded input, cropped."""
  model, variables = model_and_vars
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, *size, 2))
  out = _apply(model, variables, x)
  assert out.shape == (2, *size, 2)
  h, w = size
  xp = jnp.pad(x, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)))
  ref = _apply(model, variables, xp)[:, :h, :w]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_predict_odd_sizes_and_extents(model_and_vars):
  model, variables = model_and_vars
  rng = np.random.default_rng(0)
  for (n, h, w) in [(3, 17, 23), (5, 70, 20)]:
    images = rng.random((n, h, w, 1), dtype=np.float32)
    lq = rng.random((n, h, w)) > 0.5
    out = T.predict((model, variables), images, lq, batch_size=2, task=T.Upgrade())
    assert out.shape == (n, h, w) and out.dtype == bool
    probs = T.predict_proba((model, variables), images, lq, batch_size=2,
                              task=T.Upgrade())
    # Batched + bucket-padded prediction = one direct call on each image.
    x = np.concatenate([images, lq[..., None]], -1)
    direct = jax.nn.softmax(_apply(model, variables, x), -1)[..., 1]
    np.testing.assert_allclose(probs, direct, rtol=1e-4, atol=1e-5)
  extents = np.array([[10, 23], [17, 5], [17, 23]])
  probs = T.predict_proba((model, variables), images[:3, :17, :23],
                          lq[:3, :17, :23], extents=extents, task=T.Upgrade())
  assert np.all(probs[0, 10:] == 0) and np.all(probs[1, :, 5:] == 0)
  assert np.all(probs[2] > 0)


def test_predict_buckets_limit_compiles(model_and_vars):
  model, variables = model_and_vars
  assert [T.bucket_size(n) for n in (1, 16, 17, 64, 65, 128, 129)] == [
      16, 16, 32, 64, 128, 128, 192]
  before = engine_evaluate.forward_probs_fn()._cache_size()
  for h, w in [(17, 23), (20, 30), (31, 32), (25, 19)]:  # all -> 32 x 32
    T.predict((model, variables), np.zeros((2, h, w, 1), np.float32),
              np.zeros((2, h, w), bool), batch_size=2, task=T.Upgrade())
  assert engine_evaluate.forward_probs_fn()._cache_size() - before <= 1


def test_batchnorm_train_vs_eval(model_and_vars):
  model, variables = model_and_vars
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 2)) * 3 + 1
  # Eval: running statistics, untouched; a sample's output ignores the batch.
  eval_all = _apply(model, variables, x)
  eval_one = _apply(model, variables, x[:1])
  np.testing.assert_allclose(eval_all[:1], eval_one, rtol=1e-5, atol=1e-5)
  # Train: batch statistics, so the batch composition matters ...
  train_all, upd = _apply(model, variables, x, train=True)
  train_one, _ = _apply(model, variables, x[:1], train=True)
  assert not np.allclose(train_all[:1], train_one, atol=1e-3)
  # ... and the running mean moves by (1 - momentum) toward the batch mean of
  # the first conv's output (an independent lax.conv oracle).
  kernel = variables["params"]["down0"]["Conv_0"]["kernel"]
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = 0.1 * conv.mean(axis=(0, 1, 2))  # running mean starts at 0
  np.testing.assert_allclose(upd["batch_stats"]["down0"]["BatchNorm_0"]["mean"],
                             expected, rtol=1e-4, atol=1e-5)
  var = conv.var(axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["down0"]["BatchNorm_0"]["var"],
                             0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)


def test_bad_widths():
  with pytest.raises(ValueError, match="widths"):
    UNet(widths=(4, 8, 8)).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)),
                                train=False)


def test_cpu_prediction_compiles_without_ynnpack_and_agrees(model_and_vars):
  # predict_proba's forward on XLA:CPU drops YNNPACK's fusions (faster there,
  # BUILD_NOTES.md); the probabilities must be those of the default compile.
  model, variables = model_and_vars
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 2))
  forward = engine_evaluate.forward_probs_fn()
  assert forward is engine_evaluate.forward_probs_fn()  # one jit: its cache persists
  hlo = forward.lower(model, variables, x).compile().as_text()
  assert jax.default_backend() == "cpu" and "ynn_fusion" not in hlo
  ref = jax.jit(engine_evaluate._probs, static_argnums=0)(model, variables, x)
  np.testing.assert_allclose(forward(model, variables, x), ref, atol=1e-6)
  np.testing.assert_allclose(ref, jax.nn.softmax(_apply(model, variables, x), -1)[..., 1],
                             atol=1e-6)
