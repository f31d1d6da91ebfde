"""Intensity augmentation of training images: haze.

A hazy or unevenly lit background (a glow, a ramp across the field) is what
flooded upgraded labels on real images: after per-image percentile
normalisation a haze of height h (in units of the image's 1-99.8 percentile
range) leaves the cells' contrast divided by about 1 + h and adds a smooth
background of about h / (1 + h) · shape. `haze` draws exactly that on the
normalised training images, so u_θ learns that a bright smooth background
is still background (BUILD_NOTES.md, "Upgrade as a tool": floods on hazed
DSB2018 images with and without it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["haze", "haze_shapes"]


def haze_shapes(key, batch: int, h: int, w: int):
  """(B, H, W) float32 smooth backgrounds in [0, 1]: per sample, with
  probability 1/2 a linear ramp in a random direction (0 at one corner, 1 at
  the opposite one), else a Gaussian glow (random centre in the image, sigma
  0.2-0.6 of its longer side, 1 at the centre)."""
  k_kind, k_dir, k_c, k_s = jax.random.split(key, 4)
  side = float(max(h, w))
  yy = (jnp.arange(h, dtype=jnp.float32) / side)[None, :, None]
  xx = (jnp.arange(w, dtype=jnp.float32) / side)[None, None, :]
  theta = jax.random.uniform(k_dir, (batch, 1, 1), maxval=2 * jnp.pi)
  c, s = jnp.cos(theta), jnp.sin(theta)
  proj = c * yy + s * xx
  lo = jnp.minimum(c, 0) * (h - 1) / side + jnp.minimum(s, 0) * (w - 1) / side
  hi = jnp.maximum(c, 0) * (h - 1) / side + jnp.maximum(s, 0) * (w - 1) / side
  ramp = (proj - lo) / jnp.maximum(hi - lo, 1e-6)
  centre = jax.random.uniform(k_c, (batch, 2, 1, 1)) * jnp.array(
      [(h - 1) / side, (w - 1) / side], jnp.float32)[None, :, None, None]
  sigma = jax.random.uniform(k_s, (batch, 1, 1), minval=0.2, maxval=0.6)
  glow = jnp.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / (2 * sigma ** 2))
  is_ramp = jax.random.bernoulli(k_kind, 0.5, (batch, 1, 1))
  return jnp.clip(jnp.where(is_ramp, ramp, glow), 0.0, 1.0)


def haze(key, images, valid, strength: float):
  """Normalised images under a random haze: (x + a·b) / (1 + a) per sample,
  a ~ U(0, strength), b a `haze_shapes` background, padding left at 0.

  Args:
    key: PRNG key.
    images: (B, H, W, C) float32 normalised images (every channel gets the
      same haze: it is light, not stain).
    valid: (B, H, W) bool, the samples' real pixels.
    strength: the largest haze height a, in units of the normalised range.

  Returns:
    (B, H, W, C) float32.
  """
  b, h, w = images.shape[:3]
  k_a, k_shape = jax.random.split(key)
  a = jax.random.uniform(k_a, (b, 1, 1, 1), maxval=strength)
  bg = haze_shapes(k_shape, b, h, w)[..., None]
  out = (images + a * bg) / (1.0 + a)
  return jnp.where(valid[..., None], out, 0.0).astype(images.dtype)
