"""Soft Dice loss, the training loss of both networks.

The loss is pooled over the batch, like the pooled Dice metric
(metrics.pooled_dice): the sums run over every valid pixel of every image,

  loss = 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth),

with p the softmax foreground probability and t the binary target. Pooling
keeps images with little foreground from dominating the gradient, and the
smoothing keeps the loss finite on all-background batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_dice_loss(probs_fg, target, valid=None, smooth: float = 1.0):
  """Soft Dice loss pooled over the batch.

  Args:
    probs_fg: (B, H, W) float32 foreground probabilities in [0, 1].
    target: (B, H, W) bool or {0, 1} float binary target.
    valid: optional (B, H, W) bool; False pixels (padding) count nowhere.
    smooth: additive smoothing of numerator and denominator.

  Returns:
    Scalar float32 loss in [0, 1].

  Example:
    probs = jax.nn.softmax(logits, axis=-1)[..., 1]
    loss = soft_dice_loss(probs, target, valid)
  """
  if probs_fg.shape != target.shape:
    raise ValueError(f"soft_dice_loss: probs_fg {probs_fg.shape} and target "
                     f"{target.shape} differ in shape")
  p = probs_fg.astype(jnp.float32)
  t = jnp.asarray(target).astype(jnp.float32)
  if valid is not None:
    if valid.shape != probs_fg.shape:
      raise ValueError(f"soft_dice_loss: valid {valid.shape} != probs_fg "
                       f"{probs_fg.shape}")
    v = valid.astype(jnp.float32)
    p, t = p * v, t * v
  intersection = jnp.sum(p * t)
  total = jnp.sum(p) + jnp.sum(t)
  return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def foreground_of_logits(logits):
  """(B, H, W) bool foreground of (B, H, W, K) logits: class 1 beats class 0
  (the foreground probability exceeds 0.5). K = 3 adds the interior logit
  of `foreground_probs`, which does not enter the foreground."""
  return logits[..., 1] > logits[..., 0]


def foreground_probs(logits):
  """Probabilities of (B, H, W, K) logits as prediction returns them:
  (B, H, W) foreground = softmax of logits 0 (background) and 1 (cell),
  for K = 2; for K = 3 (the upgrade task with boundaries) (B, H, W, 2)
  [foreground, interior], interior = foreground · sigmoid(logit 2): the
  probability of a cell pixel away from the cell's boundary. The
  foreground is the two-class network's, so it trains as that one does."""
  logits = logits.astype(jnp.float32)
  fg = jax.nn.softmax(logits[..., :2], axis=-1)[..., 1]
  if logits.shape[-1] == 2:
    return fg
  return jnp.stack([fg, fg * jax.nn.sigmoid(logits[..., 2])], axis=-1)


def dice_loss_from_logits(logits, target, valid=None, smooth: float = 1.0):
  """soft_dice_loss on the softmax foreground of (B, H, W, 2) logits."""
  probs_fg = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
  return soft_dice_loss(probs_fg, target, valid, smooth)
