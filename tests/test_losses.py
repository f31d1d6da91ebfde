"""Soft Dice loss against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgrade_jax.losses import dice_loss_from_logits, soft_dice_loss


def test_hand_computed():
  p = jnp.array([[[0.9, 0.2], [0.6, 0.1]]])
  t = jnp.array([[[1, 0], [1, 0]]], bool)
  # I = 0.9 + 0.6 = 1.5; sum p = 1.8; sum t = 2: 1 - (3 + 1) / (3.8 + 1)
  assert float(soft_dice_loss(p, t)) == pytest.approx(1 - 4 / 4.8, abs=1e-6)
  assert float(soft_dice_loss(p, t, smooth=0.0)) == pytest.approx(1 - 3 / 3.8, abs=1e-6)


def test_pooled_over_batch_not_mean_of_images():
  # Image 0: p = t = one pixel. Image 1: p = 0.5 on 4 pixels, t = 0.
  p = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
  t = jnp.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], bool)
  # Pooled: I = 1, sum p = 3, sum t = 1 -> 1 - (2 + 1) / (4 + 1) = 0.4
  assert float(soft_dice_loss(p, t)) == pytest.approx(0.4, abs=1e-6)
  mean_of_images = 0.5 * (float(soft_dice_loss(p[:1], t[:1])) +
                          float(soft_dice_loss(p[1:], t[1:])))
  assert mean_of_images != pytest.approx(0.4, abs=1e-3)


def test_padded_pixels_ignored():
  rng = np.random.default_rng(0)
  p = rng.random((2, 6, 7)).astype(np.float32)
  t = rng.random((2, 6, 7)) > 0.5
  valid = np.zeros((2, 6, 7), bool)
  valid[:, :4, :5] = True
  loss = soft_dice_loss(jnp.asarray(p), jnp.asarray(t), jnp.asarray(valid))
  # Garbage on the padding changes nothing ...
  p2, t2 = p.copy(), t.copy()
  p2[~valid], t2[~valid] = 1.0, True
  loss2 = soft_dice_loss(jnp.asarray(p2), jnp.asarray(t2), jnp.asarray(valid))
  # ... and the value equals the loss on the valid region alone.
  ref = soft_dice_loss(jnp.asarray(p[:, :4, :5]), jnp.asarray(t[:, :4, :5]))
  np.testing.assert_allclose([loss, loss2], [ref, ref], rtol=1e-6)
  assert not np.isclose(float(soft_dice_loss(jnp.asarray(p2), jnp.asarray(t2))),
                        float(ref))


def test_limits_and_gradient():
  t = jnp.array([[[1, 0], [0, 1]]], bool)
  assert float(soft_dice_loss(t.astype(jnp.float32), t)) == pytest.approx(0.0)
  empty = jnp.zeros((1, 2, 2), bool)
  assert float(soft_dice_loss(jnp.zeros((1, 2, 2)), empty)) == pytest.approx(0.0)
  g = jax.grad(lambda p: soft_dice_loss(p, empty))(jnp.full((1, 2, 2), 0.3))
  assert np.all(np.isfinite(g)) and np.all(g > 0)  # pushes false positives down


def test_from_logits_uses_softmax_foreground():
  logits = jnp.array([[[[0.0, 2.0], [1.0, -1.0]]]])  # (1, 1, 2, 2)
  t = jnp.array([[[1, 0]]], bool)
  p = jax.nn.softmax(logits, -1)[..., 1]
  np.testing.assert_allclose(dice_loss_from_logits(logits, t),
                             soft_dice_loss(p, t), rtol=1e-6)


def test_shape_mismatch():
  with pytest.raises(ValueError, match="shape"):
    soft_dice_loss(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 3), bool))
  with pytest.raises(ValueError, match="valid"):
    soft_dice_loss(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), jnp.ones((2, 2), bool))
