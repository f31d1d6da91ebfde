"""The four components of P: omission, inclusion, salt-and-pepper, bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax.perturb._morphology import _binary_bias, _instance_bias
from upgrade_jax.perturb._presence import _choose, _lookup, _present
from upgrade_jax.perturb.checks import _check_int_labels, _check_rate, check_labels
from upgrade_jax.perturb.config import COUNT_EPS, COUNT_ROUNDINGS, DEFAULT_COUNT_ROUNDING


def _count(key, rate, n, rounding: str):
  """int32 scalar: how many of n objects a rate r removes (or adds).

  r·n is rarely an integer (4-5 cells per slice), and the rule decides the
  effective rate:
    "stochastic": floor(r·n) + Bernoulli(frac(r·n)); its expectation is
        exactly r·n, so the effective rate equals the nominal one on average.
    "floor": floor(r·n); biased low (30% of 4 cells removes 1 = 25%, of 3
        removes 0).
    "authors": max(1, int(r·n)) when n > 0 and r > 0, else 0 (the authors'
        code); biased high at small r·n.

  Args:
    key: PRNG key (used only by "stochastic").
    rate: float scalar in [0, 1] (may be traced).
    n: int scalar (may be traced).
    rounding: one of COUNT_ROUNDINGS (static).
  """
  r = jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
  x = r * n.astype(jnp.float32)
  base = jnp.floor(x + COUNT_EPS)
  if rounding == "floor":
    k = base
  elif rounding == "authors":
    k = jnp.where((n > 0) & (r > 0), jnp.maximum(base, 1.0), 0.0)
  elif rounding == "stochastic":
    # frac is 0 when x is within COUNT_EPS of an integer (0.7·10 is exactly 7).
    frac = jnp.clip(x - base, 0.0, 1.0)
    k = base + (jax.random.uniform(key) < frac).astype(jnp.float32)
  else:
    raise ValueError(f"count rounding {rounding!r} unknown; choose one of "
                     f"{list(COUNT_ROUNDINGS)}")
  return jnp.minimum(k, n.astype(jnp.float32)).astype(jnp.int32)


def _omitted(key, labels, rate, max_label: int, rounding: str):
  """((L+1,) bool ids dropped, (L+1,) bool ids present) of an omission."""
  k_choose, k_count = jax.random.split(key)
  present = _present(labels, max_label)
  k = _count(k_count, rate, jnp.sum(present), rounding)
  return _choose(k_choose, present, k), present


def _included(key, others, rate, max_label: int, rounding: str):
  """((L+1,) bool ids of `others` painted, (L+1,) bool ids present)."""
  k_choose, k_count = jax.random.split(key)
  present = _present(others, max_label)
  k = _count(k_count, rate, jnp.sum(present), rounding)
  return _choose(k_choose, present, k), present



def omission(key, labels, rate, *, max_label: int, rounding: str = DEFAULT_COUNT_ROUNDING):
  """Drops k ≈ rate·n of the n instances present, chosen uniformly.

  k follows `rounding` (see `_count`): by default floor(rate·n) plus a
  Bernoulli(frac(rate·n)) extra, so E[k] = rate·n exactly.

  Args:
    key: PRNG key.
    labels: (H, W) int instance map, ids in [0, max_label].
    rate: scalar in [0, 1] (may be traced, e.g. a per-sample rate under vmap).
    max_label: static bound on the ids.
    rounding: static count rule, one of COUNT_ROUNDINGS.

  Returns:
    (H, W) int32: `labels` with the dropped instances set to 0.
  """
  check_labels("labels", labels, max_label)
  _check_rate("omission rate", rate)
  labels = jnp.asarray(labels, jnp.int32)
  drop, _ = _omitted(key, labels, rate, max_label, rounding)
  lab = jnp.clip(labels, 0, max_label)
  return jnp.where(_lookup(drop, lab), 0, lab)


def inclusion(key, labels, others, rate, *, max_label: int,
              rounding: str = DEFAULT_COUNT_ROUNDING):
  """Paints k ≈ rate·m of the m objects of `others` into `labels`.

  Objects are painted on background pixels only (they never overwrite a target
  instance). A painted object of id j in `others` gets id `max_label + j`, so it
  cannot collide with an existing id; the output ids are in [0, 2·max_label].
  k follows `rounding`, the same rule as omission (see `_count`).

  Args:
    key: PRNG key.
    labels: (H, W) int target instance map, ids in [0, max_label].
    others: (H, W) int non-target instance map, ids in [0, max_label].
    rate: scalar in [0, 1] (may be traced).
    max_label: static bound on the ids of both maps.
    rounding: static count rule, one of COUNT_ROUNDINGS.

  Returns:
    (H, W) int32 instance map.
  """
  check_labels("labels", labels, max_label)
  check_labels("others", others, max_label)
  _check_rate("inclusion rate", rate)
  labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, max_label)
  others = jnp.clip(jnp.asarray(others, jnp.int32), 0, max_label)
  add, _ = _included(key, others, rate, max_label, rounding)
  paint = _lookup(add, others) & (labels == 0)
  return jnp.where(paint, others + max_label, labels)


def salt_and_pepper(key, mask, prob):
  """Flips each pixel with probability `prob`: background becomes foreground
  (salt) and foreground becomes background (pepper).

  `prob` is the expected fraction of pixels *changed*. (A replacement by a fair
  coin, as skimage's `random_noise(mode="s&p", amount=p)` does, changes only
  p/2 of a binary mask; the paper's "salt and pepper noise with a 10%
  probability" reads as 10% of pixels wrong, the reading the reproduction uses.)

  Args:
    key: PRNG key.
    mask: (H, W) bool (or int; >0 is foreground).
    prob: scalar in [0, 1] (may be traced).

  Returns:
    (H, W) bool.
  """
  _check_rate("salt_and_pepper prob", prob)
  mask = jnp.asarray(mask) > 0
  return jnp.where(_flips(key, mask.shape, prob), ~mask, mask)


def _flips(key, shape, prob):
  """(H, W) bool: True with probability prob, independently per pixel."""
  p = jnp.clip(jnp.asarray(prob, jnp.float32), 0.0, 1.0)
  return jax.random.uniform(key, shape) < p


def _salt_and_pepper_labels(key, labels, prob, noise_id):
  """Salt-and-pepper on an instance map: flipped background pixels get id
  `noise_id`, flipped instance pixels become background."""
  flip = _flips(key, labels.shape, prob)
  return jnp.where(flip, jnp.where(labels > 0, 0, noise_id), labels)



def _draw_bias(key, q_max):
  """q uniform in 1..q_max and the operation (True = dilate) with p = ½."""
  kq, kop = jax.random.split(key)
  q = jax.random.randint(kq, (), 1, q_max + 1)
  dilate = jax.random.bernoulli(kop, 0.5)
  return q, dilate



def bias(key, labels, q_max: int, *, per_instance: bool = False):
  """Dilates or erodes (p = ½ each) q times, q uniform in 1..q_max.

  The structuring element is the 3×3 all-ones square and pixels outside the
  image count as background: exactly `scipy.ndimage.binary_dilation` /
  `binary_erosion(mask, np.ones((3, 3)), iterations=q, border_value=0)`.

  Args:
    key: PRNG key.
    labels: (H, W) bool mask or int instance map (>0 is foreground).
    q_max: static int >= 1.
    per_instance: if True, each instance grows only into background (a pixel
      claimed by two instances goes to the larger id) and shrinks on its own,
      so touching instances never merge; `labels` must then be an int map.

  Returns:
    (H, W) bool mask, or, with per_instance=True, an (H, W) int32 label map.
  """
  if not isinstance(q_max, (int, np.integer)) or isinstance(q_max, bool) or q_max < 1:
    raise ValueError(f"bias q_max must be an int >= 1, got {q_max!r}")
  q, dilate = _draw_bias(key, int(q_max))
  labels = jnp.asarray(labels)
  if per_instance:
    _check_int_labels("labels", labels)
    return _instance_bias(labels.astype(jnp.int32), q, dilate, int(q_max))
  return _binary_bias(labels > 0, q, dilate, int(q_max))

