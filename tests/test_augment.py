"""The haze augmentation (upgrade_jax/engine/augment.py) and the Upgrade task's use of it."""

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax.engine import augment
from upgrade_jax.engine.tasks import Upgrade
from upgrade_jax.perturb import PerturbConfig


def test_backgrounds_are_smooth_ramps_or_glows_in_unit_range():
  bg = np.asarray(augment.haze_shapes(jax.random.PRNGKey(0), 64, 24, 40))
  assert bg.shape == (64, 24, 40) and bg.min() >= 0 and bg.max() <= 1
  corners = bg[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  is_ramp = np.isclose(corners.min(1), 0, atol=1e-5) & np.isclose(corners.max(1), 1, atol=1e-5)
  assert 10 < is_ramp.sum() < 54            # both kinds drawn
  for b in bg[is_ramp]:                      # a ramp is planar: zero second differences
    np.testing.assert_allclose(np.diff(b, 2, axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.diff(b, 2, axis=1), 0, atol=1e-5)
  for b in bg[~is_ramp]:                     # a glow peaks at 1 inside the image and falls off
    y, x = np.unravel_index(b.argmax(), b.shape)
    assert b[y, x] > 0.9 and b.min() < b[y, x]
  assert np.abs(np.diff(bg, axis=2)).max() < 0.2   # smooth: no pixel-to-pixel jumps


def test_haze_is_the_formula_per_sample_and_leaves_padding_at_zero():
  key = jax.random.PRNGKey(3)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (5, 16, 20, 2)).astype(np.float32)
  valid = np.ones((5, 16, 20), bool)
  valid[:, 12:] = False
  out = np.asarray(augment.haze(key, jnp.asarray(x), jnp.asarray(valid), 0.8))
  assert out.dtype == np.float32 and (out[~valid] == 0).all()
  k_a, k_shape = jax.random.split(key)
  a = np.asarray(jax.random.uniform(k_a, (5, 1, 1, 1), maxval=0.8))
  bg = np.asarray(augment.haze_shapes(k_shape, 5, 16, 20))[..., None]
  want = np.where(valid[..., None], (x + a * bg) / (1 + a), 0)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  assert 0 < a.min() and a.max() <= 0.8
  # Every channel gets the same haze: their difference only shrinks by 1 + a.
  np.testing.assert_allclose(out[..., 0] - out[..., 1], np.where(
      valid, (x[..., 0] - x[..., 1]) / (1 + a[..., 0]), 0), atol=1e-6)


def test_upgrade_task_hazes_training_images_only():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(0, 1, (3, 32, 32, 1)), jnp.float32)
  targets = np.zeros((3, 32, 32), np.int32)
  targets[:, 4:12, 4:12], targets[:, 18:28, 16:26] = 1, 2
  targets = jnp.asarray(targets)
  valid = jnp.ones((3, 32, 32), bool)
  p = PerturbConfig(omission_rate=0.5)
  key = jax.random.PRNGKey(7)
  plain, hazed = Upgrade(perturb=p), Upgrade(perturb=p, haze=0.5)
  def pair(task, train):   # jitted: eager perturbation dispatches op by op
    return jax.jit(lambda k: task.pair(k, images, targets, targets * 0, max_label=2,
                                       valid=valid, train=train))(key)

  (xi, ti), (xh, th) = pair(plain, True), pair(hazed, True)
  np.testing.assert_array_equal(ti, th)                       # same target
  np.testing.assert_array_equal(xi[..., 1], xh[..., 1])       # same perturbed label
  np.testing.assert_array_equal(xi[..., 0], images[..., 0])   # no haze without the option
  assert np.abs(np.asarray(xh[..., 0] - xi[..., 0])).max() > 0.01
  (vi, _), (vh, _) = pair(plain, False), pair(hazed, False)
  np.testing.assert_array_equal(vi, vh)                       # validation sees no haze
