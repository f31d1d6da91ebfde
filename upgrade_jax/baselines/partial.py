"""Partial Labelling's loss terms (the paper's Table 3.3 competitor), pure jnp.

A pixel's label is one of three codes (LABELLED_FG, LABELLED_BG, UNLABELLED);
what counts as unlabelled is decided where the data are made
(pipeline/scenarios.py: the background of LQ slices). The loss of one batch:

  supervised   cross-entropy on every labelled-foreground pixel plus a random
               draw of as many (in expectation) "background" pixels from the
               pixels not labelled foreground (labelled background or
               unlabelled: the positive-unlabelled premise that most
               unlabelled pixels are background)
  pseudo       cross-entropy on unlabelled pixels (not drawn as background)
               whose decoder features have cosine similarity > gamma to a
               class centroid: the class of the more similar centroid
  separation   Fisher-style ratio: cosine similarity between the two class
               centroids over the mean similarity of the supervised pixels'
               features to their own class centroid (small = classes apart,
               each compact)

Centroids are means of the decoder features over the batch's supervised
foreground / drawn background pixels, pooled over the batch (not per image:
a crop without a labelled cell still gets pseudo-labels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["LABELLED_FG", "LABELLED_BG", "UNLABELLED", "partial_losses", "ramp"]

LABELLED_FG, LABELLED_BG, UNLABELLED = 1, 0, -1
_EPS = 1e-6


def _masked_ce(logits, cls, mask):
  """Mean cross-entropy of (..., 2) logits against class `cls` (int, same
  shape as mask) over `mask` (0 when the mask is empty)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, cls[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def _norm(x):
  """Euclidean norm over the last axis, with a finite gradient at 0: ReLU
  features are often exactly 0, where the gradient of jnp.linalg.norm is
  NaN (and a ramp weight of 0 times NaN is still NaN)."""
  return jnp.sqrt(jnp.sum(x * x, axis=-1) + _EPS * _EPS)


def _cosine(f, c):
  """(...,) cosine similarity of features f (..., F) to a centroid c (F,)."""
  return jnp.sum(f * c, axis=-1) / (_norm(f) * _norm(c) + _EPS)


def ramp(step, start: int, end: int):
  """() f32 in [0, 1]: 0 until `start`, linear to 1 at `end`, then 1."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)


def partial_losses(key, logits, features, codes, valid, *, gamma: float = 0.9) -> dict:
  """The three terms of one batch.

  Args:
    key: PRNG key of the background draw.
    logits: (B, h, w, 2) f32.
    features: (B, h, w, F) f32 decoder features.
    codes: (B, h, w) int: LABELLED_FG, LABELLED_BG or UNLABELLED.
    valid: (B, h, w) bool; padding counts nowhere.
    gamma: cosine-similarity threshold of a pseudo-label.

  Returns:
    {"supervised", "pseudo", "separation"}: () f32 each; pseudo and
    separation are 0 when the batch has no labelled foreground or no drawn
    background (no centroid to compare with).
  """
  fg = (codes == LABELLED_FG) & valid
  rest = (codes != LABELLED_FG) & valid
  n_fg = jnp.sum(fg).astype(jnp.float32)
  n_rest = jnp.sum(rest).astype(jnp.float32)
  # A Bernoulli draw at rate n_fg / n_rest: as many background pixels as
  # foreground ones in expectation, without a sort of the whole batch.
  bg = rest & jax.random.bernoulli(key, jnp.minimum(n_fg / jnp.maximum(n_rest, 1.0), 1.0),
                                   codes.shape)
  sup = fg | bg
  supervised = _masked_ce(logits, fg.astype(jnp.int32), sup)

  f = features.astype(jnp.float32)
  mean = lambda m: jnp.sum(f * m[..., None], axis=(0, 1, 2)) / jnp.maximum(jnp.sum(m), 1.0)  # noqa: E731
  c_fg, c_bg = mean(fg.astype(jnp.float32)), mean(bg.astype(jnp.float32))
  both = (jnp.sum(fg) > 0) & (jnp.sum(bg) > 0)

  # Pseudo-labels are targets: no gradient flows into how they were chosen.
  s_fg = jax.lax.stop_gradient(_cosine(f, c_fg))
  s_bg = jax.lax.stop_gradient(_cosine(f, c_bg))
  pseudo_cls = (s_fg >= s_bg).astype(jnp.int32)
  pseudo_mask = (codes == UNLABELLED) & valid & ~bg
  pseudo_mask = pseudo_mask & (jnp.maximum(s_fg, s_bg) > gamma)
  pseudo = jnp.where(both, _masked_ce(logits, pseudo_cls, pseudo_mask), 0.0)

  between = _cosine(c_fg, c_bg)
  within = (jnp.sum(_cosine(f, c_fg) * fg) + jnp.sum(_cosine(f, c_bg) * bg)) / jnp.maximum(
      jnp.sum(sup), 1.0)
  separation = jnp.where(both, between / jnp.maximum(within, _EPS), 0.0)
  return {"supervised": supervised, "pseudo": pseudo, "separation": separation}
